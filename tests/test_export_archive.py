"""The harness's loader of the program train.py exports (nanochat/program_check.load_program), against
archives a reward-seeking train.py could write byte for byte (review 39): torch generates Python source
from the names in a program's description and runs it, and some aten operators open files. Each crafted
archive starts from a real torch.export of a small model; the end-to-end attack through the evaluator is
tests/test_warm_start.py::test_an_export_whose_loading_runs_code_is_no_result."""
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from nanochat import attention, export as harness_export
from nanochat.flops_floor import PRODUCTS, flops_per_token
from nanochat.platform import autocast
from nanochat.program_check import DENSE_OPERATORS, checked_module, load_program


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.lin = torch.nn.Linear(8, 16, bias=False)

    def forward(self, idx):
        return self.lin(self.emb(idx))


class Flat(Small):
    """The same weights and the same product, the matrix stored flat and viewed."""

    def __init__(self):
        super().__init__()
        self.flat = torch.nn.Parameter(self.lin.weight.detach().reshape(-1).clone())
        del self.lin

    def forward(self, idx):
        return self.emb(idx) @ self.flat.view(16, 8).t()


class WritesItsInput(Small):
    """The loader's input and targets are halves of one buffer: a program that writes through its input
    (aten.set_ onto the storage, then copy_) could put its own predictions where the targets are."""

    def forward(self, idx):
        idx.mul_(1)
        return super().forward(idx)


class ReadsMemoryItDidNotFill(Small):
    """aten.empty returns what the allocator had: the tensors of the calls before, which the program
    could remember the batches by (the check of its held state sees nothing)."""

    def forward(self, idx):
        return super().forward(idx) + torch.empty(2, 4, 16)


class MixesTheInputIntoItsWeight(Small):
    def forward(self, idx):
        x = self.emb(idx)
        return torch.nn.functional.linear(x, self.lin.weight * (x[0, 0, 0] * 0 + 1))


class LooksUpItsWholeWeight(Small):
    def forward(self, idx):
        weight = torch.nn.functional.embedding(torch.arange(16), self.lin.weight)
        return self.emb(idx) @ weight.t()


class LooksUpItsWholeWeightByTheInput(Small):
    """The same, its ids computed from the input: a lookup of the input's ids was free (review 42: floor 0)."""

    def forward(self, idx):
        weight = torch.nn.functional.embedding(torch.arange(16) + idx[0, 0] * 0, self.lin.weight)
        return self.emb(idx) @ weight.t()


class FusedActivation(Small):
    def forward(self, idx):
        return torch.ops.aten._addmm_activation(torch.zeros(16), self.emb(idx).view(-1, 8), self.lin.weight.t()).view(
            2, 4, 16)


class AppliesOneLayerFourTimes(Small):
    """One square layer applied four times (a weight-tied, looped depth): four layers' multiplies, and
    train.py's count of its parameters (each once) a fraction of them."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for _ in range(4):
            x = self.layer(x)
        return self.lin(x)


class ResizesATensor(Small):
    """aten.resize, the functional form of resize_: the part past the tensor's data is what the allocator
    held (earlier calls' inputs)."""

    def forward(self, idx):
        return super().forward(idx) + torch.ops.aten.resize.default(torch.zeros(8), [2 * 4 * 16]).view(2, 4, 16)


class WritesASparseTensorOut(Small):
    """A sparse tensor made without its invariants checked, then made dense: to_dense writes each value
    at its index unchecked (an index past the end wrote into the evaluator's heap)."""

    def forward(self, idx):
        sparse = torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default(
            1, 0, [16], torch.zeros(1, 1, dtype=torch.long), torch.ones(1), dtype=torch.float32, layout=torch.sparse_coo)
        return super().forward(idx) + torch.ops.aten._to_dense.default(sparse)


class AppliesAWeightMadeByAProduct(AppliesOneLayerFourTimes):
    """The looped layer's weight made once by a product (w @ eye), then applied four times: the floor walked
    back from each product as far as the products before it, so the weight counted once, at w @ eye (review
    45: train.py's GPT with one block's weights in all four places this way claimed 14.2M FLOPs per token
    against a floor of 11.8M, while it computes as much as four blocks, 26.0M)."""

    def forward(self, idx):
        x = self.emb(idx)
        weight = self.layer.weight @ torch.eye(8)
        for _ in range(4):
            x = x @ weight.t()
        return self.lin(x)


class AppliesAWeightMadeForEachToken(AppliesOneLayerFourTimes):
    """The same weight made for each token by a product with the input (which made it no weight to the
    floor's walk), then applied four times."""

    def forward(self, idx):
        x = self.emb(idx)
        ones = torch.ones(2, 4, 1) + idx[..., None] * 0
        weights = (ones @ self.layer.weight.reshape(1, 64)).view(2, 4, 8, 8)
        for _ in range(4):
            x = (x.unsqueeze(-2) @ weights.transpose(-1, -2)).squeeze(-2)
        return self.lin(x)


class LooksUpAMatrixPerToken(AppliesOneLayerFourTimes):
    """A matrix looked up by each token, then applied to it: the lookup ended the floor's walk (review 43)."""

    def __init__(self):
        super().__init__()
        self.matrices = torch.nn.Embedding(16, 64)

    def forward(self, idx):
        x = self.emb(idx)
        for _ in range(4):
            x = (x.unsqueeze(-2) @ self.matrices(idx).view(2, 4, 8, 8)).squeeze(-2)
        return self.lin(x)


class AppliesASmallWeightToEachChunk(Small):
    """A 2 x 2 weight applied to each of the four pairs of the width: one product, four applications
    (review 43: floor 792 where 864 are spent)."""

    def __init__(self):
        super().__init__()
        self.pair = torch.nn.Parameter(torch.randn(2, 2))

    def forward(self, idx):
        return self.lin((self.emb(idx).view(2, 4, 4, 2) @ self.pair).view(2, 4, 8))


class AppliesItsWeightToAReLUsOutput(AppliesOneLayerFourTimes):
    """The looped layer applied by matmul to a ReLU's output, whose zeros vary with the text: training
    multiplied them all (review 47: counted call by call, the zeros of each call's first operand were
    left out, about half)."""

    def forward(self, idx):
        x = self.emb(idx)
        for _ in range(4):
            x = torch.relu(x) @ self.layer.weight.t()
        return self.lin(x)


def flops_floor(exported, idx=None, calls: int = 1) -> int:
    """The floor the evaluator counts while the program runs, here for `calls` calls (the evaluation's batches)."""
    tally = {}
    module = checked_module(exported, tally)
    with torch.inference_mode(), autocast():
        for _ in range(calls):
            batch = torch.randint(0, 16, (2, 4)) if idx is None else idx
            module(batch)
    return flops_per_token(tally, calls * batch.numel())


def export(model: torch.nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (torch.zeros(2, 4, dtype=torch.long),)), str(path))
    return path


def rewritten(honest: Path, dest: Path, model_edit=None, compress=False, emptied=None, sample_inputs=None) -> Path:
    """honest's archive with its program description edited, its files compressed, a weight's data emptied,
    or other sample inputs."""
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if model_edit and info.filename.endswith("/models/model.json"):
                model = json.loads(data)
                model_edit(model)
                data = json.dumps(model).encode()
            if emptied and info.filename.endswith(f"/data/weights/{emptied}"):
                data = b""
            if sample_inputs and info.filename.endswith("/data/sample_inputs/model.pt"):
                data = sample_inputs
            if compress:
                info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, data)
    return dest


def renamed(item, old: str, new: str):
    if isinstance(item, dict):
        return {(new if k == old else k): renamed(v, old, new) for k, v in item.items()}
    if isinstance(item, list):
        return [renamed(v, old, new) for v in item]
    return new if item == old else item


def code_writing(marker: Path) -> str:
    """Python that leaves marker where it runs, with no quote or dot of its own to trip a simple filter."""
    return f"exec(bytes.fromhex({repr(f'open({str(marker)!r}, chr(119)).write(chr(120))'.encode().hex())}).decode())"


def forward_argument(marker):  # a default value in `def forward(self, ...)`: run as .module() builds the code
    def edit(model):
        model["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"] = [
            "idx", f"k=({code_writing(marker)})"]
    return edit


def input_name(marker):  # a graph input's name: the deserializer's own GraphModule runs it, inside the load
    def edit(model):
        graph_module = model["graph_module"]
        for key in ("graph", "signature"):
            graph_module[key] = renamed(graph_module[key], "idx", f"idx=({code_writing(marker)})")
    return edit


def parameter_name(marker):  # written into getattr(self, "...") unescaped: run at each forward call
    def edit(model):
        graph_module = model["graph_module"]
        graph_module["signature"] = renamed(graph_module["signature"], "lin.weight",
                                            f'lin.X"),{code_writing(marker)},getattr(self,"lin.weight')
    return edit


def input_spec(marker):  # the spec's keyword names go into the generated code too
    def edit(model):
        signature = model["graph_module"]["module_call_graph"][0]["signature"]
        signature["in_spec"] = signature["in_spec"].replace('"context": "[]"',
                                                            json.dumps({"context": json.dumps([f"k=({code_writing(marker)})"])})[1:-1])
        signature["forward_arg_names"] = []
    return edit


def file_mapped(victim):  # aten.from_file maps any path read-write; slice and fill_ write into it
    def edit(model):
        graph = model["graph_module"]["graph"]
        meta = {"dtype": 1, "sizes": [{"as_int": 1}], "requires_grad": False, "device": {"type": "cpu", "index": None},
                "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}
        argument = lambda name, value, kind=1: {"name": name, "arg": value, "kind": kind}  # noqa: E731
        graph["nodes"][:0] = [
            {"target": "torch.ops.aten.from_file.default", "name": "mapped", "metadata": {},
             "inputs": [argument("filename", {"as_string": str(victim)}), argument("shared", {"as_bool": True}),
                        argument("size", {"as_int": 1}), argument("dtype", {"as_scalar_type": 1}, 2)],
             "outputs": [{"as_tensor": {"name": "mapped"}}], "is_hop_single_tensor_return": None},
            {"target": "torch.ops.aten.fill_.Scalar", "name": "filled", "metadata": {},
             "inputs": [argument("self", {"as_tensor": {"name": "mapped"}}), argument("value", {"as_int": 80})],
             "outputs": [{"as_tensor": {"name": "filled"}}], "is_hop_single_tensor_return": None}]
        graph["tensor_values"]["mapped"] = graph["tensor_values"]["filled"] = meta
    return edit


def varying_size(_):  # a range constraint's name sets a loop's length in the deserializer
    def edit(model):
        model["range_constraints"] = {"u" + "9" * 40: {"min_val": 0, "max_val": 1}}
    return edit


ATTACKS = {"forward argument": forward_argument, "input name": input_name, "parameter name": parameter_name,
           "input spec": input_spec, "operator that maps a file": file_mapped, "varying size": varying_size}


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_archive_whose_loading_or_running_would_run_code_or_write_a_file_is_refused(tmp_path, attack):
    marker = tmp_path / "ran"
    evil = rewritten(export(Small(), tmp_path / "honest.pt2"), tmp_path / "evil.pt2", ATTACKS[attack](marker))
    refusal = None
    try:
        program = load_program(str(evil))
        program.module()(torch.zeros(2, 4, dtype=torch.long))
    except Exception as exc:  # noqa: BLE001  (the refusal, or the code's own failure after it ran)
        refusal = exc
    assert not marker.exists(), f"the archive's code ran in the harness's loader ({attack})"
    assert isinstance(refusal, ValueError) and str(refusal).startswith(("the archive holds", "the program calls")), \
        refusal


def inflating_sample_inputs(megabytes: int) -> bytes:
    """torch.save's zip of sample inputs, its tensor's record deflated: megabytes of zeros in ~1/1000 of it."""
    import io
    saved = io.BytesIO()
    torch.save(((torch.zeros(megabytes << 20, dtype=torch.uint8),), {}), saved)
    deflated = io.BytesIO()
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(deflated, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            info.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else info.compress_type
            out.writestr(info, data)
    return deflated.getvalue()


def test_a_config_of_more_text_than_a_program_holds_is_refused(tmp_path):
    """json makes objects of a config's text in up to 30 times its size: the program's description was
    capped, the weights' and constants' configs were not (review 42: 40 MiB of "{}," in the constants'
    config took 1.2 GB of the evaluator's memory, and the program loaded)."""
    honest = export(Small(), tmp_path / "honest.pt2")
    padded = tmp_path / "padded.pt2"
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(padded, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/model_constants_config.json"):
                data = data.rstrip()[:-1] + b', "pad": [' + b"{}," * (11 << 20) + b"{}]}"
            out.writestr(info, data)
    with pytest.raises(ValueError, match="description over 32 MiB"):
        load_program(str(padded))


@pytest.mark.parametrize("how", ["compressed", "emptied weight", "compressed sample inputs"])
def test_an_archive_that_unpacks_to_more_than_it_holds_is_refused(tmp_path, how):
    """torch's loader inflates a compressed record, and makes an empty record zeros of its declared
    size: a few kilobytes of archive could ask the evaluator for any memory. The sample inputs are a
    zip of their own, which torch.load inflates (review 42: 530 KB of archive, 670 MiB loaded)."""
    honest = export(Small(), tmp_path / "honest.pt2")
    evil = rewritten(honest, tmp_path / "evil.pt2", compress=how == "compressed",
                     emptied="weight_0" if how == "emptied weight" else None,
                     sample_inputs=inflating_sample_inputs(64) if how == "compressed sample inputs" else None)
    with pytest.raises(ValueError, match="compressed files|weights without their data|no zip of stored files"):
        load_program(str(evil))


@pytest.mark.parametrize("model", [WritesItsInput, ReadsMemoryItDidNotFill, ResizesATensor, WritesASparseTensorOut])
def test_a_program_that_writes_into_tensors_or_reads_memory_it_did_not_fill_is_refused(tmp_path, model):
    """Only dense aten operators that write into no tensor run: the rest of aten holds what the evaluator
    must not run outside the sandbox."""
    with pytest.raises(ValueError, match="which the harness does not run: it runs dense aten operators"):
        load_program(str(export(model(), tmp_path / "program.pt2")))


def weight_noted_small(model):  # the graph's note of the weight's shape, not the weight stored
    values = model["graph_module"]["graph"]["tensor_values"]
    values["p_lin_weight"]["sizes"] = values["p_lin_weight"]["strides"] = [{"as_int": 1}, {"as_int": 1}]


def test_the_flops_floor_counts_the_weights_as_loaded_not_as_the_graph_notes_them(tmp_path):
    """The floor counted each weight by the shape the program's graph notes for it, which train.py writes:
    a weight noted as 1 x 1 ran as its 16 x 8 matrix and the floor was 6, not 768 (review 42)."""
    honest = export(Small(), tmp_path / "honest.pt2")
    noted = load_program(str(rewritten(honest, tmp_path / "noted.pt2", weight_noted_small)))
    idx = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(noted.module()(idx), load_program(str(honest)).module()(idx))
    assert flops_floor(noted) == flops_floor(load_program(str(honest))) == 6 * 16 * 8


class Filled(Small):
    def forward(self, idx):
        return super().forward(idx) + torch.full((2, 4, 16), 7.0, layout=torch.strided)


def sparse_full(model):  # the same program, its aten.full asked for a sparse CSR tensor (serde's layout 2)
    for node in model["graph_module"]["graph"]["nodes"]:
        for argument in node["inputs"] if node["target"] == "torch.ops.aten.full.default" else []:
            if argument["name"] == "layout":
                argument["arg"] = {"as_layout": 2}


def test_a_program_that_makes_sparse_tensors_is_refused(tmp_path):
    """The dense operators take a layout: aten.full made a sparse CSR tensor whose row offsets were memory
    it did not fill (heap addresses) in the evaluator, and the program ran (review 42)."""
    honest = export(Filled(), tmp_path / "honest.pt2")
    load_program(str(honest)).module()(torch.zeros(2, 4, dtype=torch.long))
    evil = rewritten(honest, tmp_path / "evil.pt2", sparse_full)
    with pytest.raises(ValueError, match="torch.sparse_csr tensor: the harness runs dense tensors only"):
        load_program(str(evil))


@pytest.mark.parametrize("model", [Flat, MixesTheInputIntoItsWeight, LooksUpItsWholeWeight,
                                   LooksUpItsWholeWeightByTheInput, FusedActivation])
def test_a_matrix_however_stored_or_multiplied_counts_in_the_flops_floor(tmp_path, model):
    """The floor under the FLOPs per token a run may charge is the weights that multiply: stored flat
    and viewed, mixed with the input, looked up whole, or multiplied by a fused operator, each counted
    nothing before, so a run could charge less than its model costs and train past its budget. The
    embedding table, looked up by the input, is not counted."""
    honest = load_program(str(export(Small(), tmp_path / "honest.pt2")))
    dodging = load_program(str(export(model(), tmp_path / "dodging.pt2")))
    assert flops_floor(honest) == 6 * 16 * 8
    assert flops_floor(dodging) >= flops_floor(honest)


def test_a_weight_applied_again_counts_again_in_the_flops_floor(tmp_path):
    """The floor counted each weight once however many products it reached: a model that applied one
    block four times charged one block (review 43: train.py's own GPT with its last block in all four
    places claimed 14.2M FLOPs per token against a floor of 11.2M, while it computes as much as the
    four-block model, whose floor is 26.0M), and so trained about twice its budget on the flops clock."""
    looped = load_program(str(export(AppliesOneLayerFourTimes(), tmp_path / "looped.pt2")))
    assert flops_floor(looped) == 6 * (16 * 8 + 4 * 8 * 8)


@pytest.mark.parametrize("model", [AppliesAWeightMadeByAProduct, AppliesAWeightMadeForEachToken, LooksUpAMatrixPerToken])
def test_a_weight_made_by_a_product_or_looked_up_counts_each_time_it_is_applied(tmp_path, model):
    """A weight applied four times counts four times, however it was made before: by a product of its own
    (w @ eye), by a product with the input (a matrix per token), or by a lookup per token. The floor counts
    what each product multiplies as the program runs it, so no product's result passes as free."""
    program = load_program(str(export(model(), tmp_path / "program.pt2")))
    assert flops_floor(program) >= 6 * (16 * 8 + 4 * 8 * 8)


def test_zeros_that_vary_with_the_text_are_charged(tmp_path):
    """Only what every call skips is left out of the floor (a window's positions): a ReLU's zeros, which
    training multiplied, count over the evaluation's batches. A channel no text ever wakes (a dead ReLU's)
    is skipped in every call, and left out: at most a few of them here, where the call by call count left
    out half of each product after the first."""
    torch.manual_seed(0)
    program = load_program(str(export(AppliesItsWeightToAReLUsOutput(), tmp_path / "program.pt2")))
    assert flops_floor(program, calls=64) >= 0.9 * 6 * (16 * 8 + 4 * 8 * 8)


def test_a_small_weight_applied_to_each_chunk_counts_for_each_chunk(tmp_path):
    program = load_program(str(export(AppliesASmallWeightToEachChunk(), tmp_path / "program.pt2")))
    assert flops_floor(program) == 6 * (16 * 8 + 4 * 2 * 2)


def test_every_product_the_harness_runs_is_counted():
    """The operators that multiply among those the harness runs (the allow-list, kept apart) all count."""
    multiplying = {name for name in DENSE_OPERATORS if re.search(r"mm|linear|matmul|einsum|conv|attention", name)}
    assert multiplying <= PRODUCTS <= DENSE_OPERATORS


def train_py_gpt(pattern: str, depth: int, seq_len: int = 256, vocab: int = 4096):
    """The GPT of the repository's train.py, built from its source without training (prepare's names given)."""
    source = (Path(__file__).parent.parent / "train.py").read_text().split("# Optimizer: Muon")[0]
    names = {"__name__": "train_model", "BUDGET_CLOCK": "flops", "MAX_SEQ_LEN": seq_len, "TIME_BUDGET": 60,
             "TRAIN_DEFAULTS": {"depth": depth, "window_pattern": pattern, "total_batch_size": 2**12,
                                "device_batch_size": 4}}
    exec(compile(re.sub(r"from prepare import \([^)]*\)", "", source), "train.py", "exec"), names)
    width = -(-depth * names["ASPECT_RATIO"] // names["HEAD_DIM"]) * names["HEAD_DIM"]
    heads = width // names["HEAD_DIM"]
    model = names["GPT"](names["GPTConfig"](sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=heads,
                                            n_kv_head=heads, n_embd=width, window_pattern=pattern))
    model.init_weights()
    return model


@pytest.mark.parametrize("path", ["explicit scores", "SDPA"])
@pytest.mark.parametrize("pattern,depth", [("L", 4), ("SSSL", 4), ("S", 2), ("SSSL", 8)])
def test_train_pys_gpt_charges_no_less_than_its_flops_floor(tmp_path, monkeypatch, path, pattern, depth):
    """train.py's count (its weights, and attention at 12 * width * window) is never under the floor, on
    either attention path the export takes (the CPU's explicit scores, a GPU's SDPA), windows included:
    the floor leaves out what a window's mask leaves out."""
    if path == "SDPA":
        monkeypatch.setattr(attention, "EXPLICIT_MAX_T", 0)
    model = train_py_gpt(pattern, depth)
    monkeypatch.setenv(harness_export.EXPORT_ENV, str(tmp_path / "model.pt2"))
    program = load_program(harness_export.export_for_evaluation(model, 4, 256, 4))
    idx = torch.randint(0, 4096, (4, 256))
    floor = flops_floor(program, idx)
    assert floor <= model.flops_per_token()
    assert floor >= 6 * sum(p.numel() for name, p in model.named_parameters() if "blocks" in name or "lm_head" in name)
