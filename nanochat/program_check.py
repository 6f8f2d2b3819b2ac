"""What the harness will load and run of the program train.py exported: its archive (.pt2, written by
train.py byte for byte) is read with torch's own reader and checked before torch's loader sees it, and
the loaded graph's operators after. The evaluator (evaluate_export.py) loads it outside the run's
sandbox, where code run by the loader, a file an operator maps, or a write past a tensor's end could
write any result. Each check answers why it refuses, or None.
"""
import ast
import functools
import io
import json
import math
import operator
import re
import zipfile

# What a program's archive may hold, as torch.export.save writes it for this harness (static shapes, aten
# operators, tensors stored raw): train.py writes the file, and torch's loader runs code from it (a weight or
# constant marked use_pickle and a legacy state dict go through torch.load without weights_only, an opaque
# constant through pickle.loads, a symbolic size's text through sympy.sympify, guards' text as code, an
# AOTInductor folder as a compiled library), in this process, outside the run's sandbox, where it could
# write any result.
ARCHIVE_FILES = re.compile(r"(models/model\.json|data/weights/weight_\d+|data/weights/model_weights_config\.json"
                           r"|data/constants/tensor_\d+|data/constants/model_constants_config\.json"
                           r"|data/sample_inputs/model\.pt|archive_format|archive_version|byteorder|"
                           r"\.data/version|\.data/serialization_id)")
PROGRAM_TARGETS = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]*")
FLOAT_WORDS = {"Infinity", "-Infinity", "NaN"}
VERSION = re.compile(r"[A-Za-z0-9_.+]+")
SAMPLE_INPUTS = "data/sample_inputs/model.pt"  # torch.save's own zip, inside the archive
MAX_PROGRAM_TEXT_BYTES = 32 * 2**20  # json holds it in about 16 times that; a 24-layer GPT's is ~3 MiB
# The aten operators beside the pointwise ones a program may call: dense, bounds-checked, filled with values
DENSE_OPERATORS = {
    # shapes, views and copies
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "expand_as", "unsqueeze", "squeeze",
    "slice", "select", "narrow", "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "flatten",
    "unflatten", "alias", "clone", "contiguous", "to", "_to_copy", "type_as", "repeat", "roll", "flip", "movedim",
    "diagonal", "view_as", "detach", "lift_fresh_copy", "_assert_tensor_metadata", "index_select", "gather", "index",
    "triu", "tril", "pad", "constant_pad_nd", "tile", "__or__", "__and__", "__xor__",
    # tensors filled with values
    "arange", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "scalar_tensor", "new_zeros",
    "new_ones", "new_full", "linspace", "eye", "one_hot",
    # reductions
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "prod", "softmax", "_softmax",
    "log_softmax", "_log_softmax", "logsumexp", "cumsum", "argmax", "argmin", "norm", "linalg_vector_norm", "any",
    "all",
    # products, attention, norms, lookups
    "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "_addmm_activation", "scaled_dot_product_attention",
    "embedding", "rms_norm",
    "_fused_rms_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "conv1d", "conv2d",
    "convolution", "_convolution",
}
# Attention's kernels trust their arguments' shapes: the CPU's read the keys as far as the values go (a key
# shorter than its values read the evaluator's heap, and crashed it), the fused entry points (_scaled_dot_product_*)
# past the batch and heads they are given, or divide by zero heads. The evaluator checks each call's tensors first
# (checked_module); the fused entry points are not run at all (a program calls scaled_dot_product_attention).
ATTENTION = "scaled_dot_product_attention"
# An operator's text arguments the harness passes: a mode's name (parsed by the operator), or an assert's message
MODE_ARGUMENTS = {"approximate", "rounding_mode", "reduce", "padding", "side", "indexing", "interpolation", "norm",
                  "mode", "equation", "UPLO", "driver", "ord", "pad_mode", "padding_side", "activation", "assert_msg"}

# A symbolic size is text that sympy.sympify evaluates as Python: only arithmetic on symbols (u0, s1) and
# sympy's and torch's functions of sizes, nothing that names any other object, an attribute or a string
EXPRESSION_NAMES = re.compile(r"[a-z]+[0-9]+")
EXPRESSION_CALLS = {"Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
                    "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv",
                    "CeilToInt", "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift",
                    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
                    "ToFloat", "FloatPow", "PowByNatural", "Identity"}


def plain_expression(text) -> bool:
    """Whether a symbolic size's text is arithmetic on symbols (EXPRESSION_NAMES) and size functions
    (EXPRESSION_CALLS) only."""
    try:
        tree = ast.parse(str(text), mode="eval")
    except (SyntaxError, ValueError):
        return False
    calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if not (EXPRESSION_NAMES.fullmatch(node.id) or (id(node) in calls and node.id in EXPRESSION_CALLS)):
                return False
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                return False
        elif isinstance(node, ast.keyword):
            if not (node.arg and node.arg.isalpha() and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, bool)):
                return False
        elif isinstance(node, ast.Constant):
            if not (isinstance(node.value, (bool, int, float)) or
                    (isinstance(node.value, str) and EXPRESSION_NAMES.fullmatch(node.value))):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator,
                                   ast.unaryop, ast.boolop, ast.cmpop, ast.Load)):
            return False
    return True


def archive_problem(reader, records: dict) -> str | None:
    """Why the harness will not load this archive (torch's own reader: what its loader would read), or None.
    records: {name inside the archive: its zip entry}."""
    names = reader.get_file_names()
    odd = sorted(name for name in names if not ARCHIVE_FILES.fullmatch(name))
    if odd or len(set(names)) != len(names) or "models/model.json" not in names:
        return f"files no exported program of this harness holds ({', '.join(odd[:3]) or 'names repeated or missing'})"
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in records.values()):
        return "compressed files (torch.export.save stores them raw; a small archive would unpack to any size)"
    if SAMPLE_INPUTS in records and not stored_zip(reader.read_bytes(SAMPLE_INPUTS)):
        return "sample inputs that are no zip of stored files (torch.load inflates a compressed one to any size)"
    # every description, not only the program's: json holds a config's text in up to 30 times its size too
    # (review 42: 40 MiB of "{}," in the constants' config took 1.2 GB of the evaluator's memory)
    if any(name.endswith(".json") and entry.file_size > MAX_PROGRAM_TEXT_BYTES for name, entry in records.items()):
        return f"a program description over {MAX_PROGRAM_TEXT_BYTES >> 20} MiB of text"
    for kind in ("weights", "constants"):
        config = json.loads(reader.read_bytes(f"data/{kind}/model_{kind}_config.json"))
        problem = text_problem(config) or payload_problem(config["config"], kind, records)
        if problem:
            return problem
    model = json.loads(reader.read_bytes("models/model.json"))
    if model.get("guards_code"):
        return "guards (code the loader runs)"
    if model.get("range_constraints"):
        return "sizes that vary (range constraints): the harness's programs have fixed shapes"
    graph_module = model["graph_module"]
    calls = graph_module["module_call_graph"]
    signature = calls[0]["signature"] if calls and calls[0]["fqn"] == "" else {}
    if (signature.get("in_spec"), signature.get("out_spec")) != program_specs() or any(
            call["signature"] is not None for call in calls[1:]):
        return "inputs or outputs other than one tensor in, its logits out"
    if graph_module["graph"].get("custom_obj_values") or graph_module.get("treespec_namedtuple_fields"):
        return "objects or named tuples no program of this harness holds"
    bad = [node.get("target") for node in graph_module["graph"]["nodes"]
           if not PROGRAM_TARGETS.fullmatch(str(node.get("target")))]
    if bad:
        return f"an operator the harness does not run ({str(bad[0])[:80]})"
    return text_problem(model)


def stored_zip(data: bytes) -> bool:
    """Whether bytes are a zip whose files are all stored raw, as torch.save writes them: the loader reads
    the archive's sample inputs with torch.load, which inflates a compressed record (review 42: 530 KB of
    archive took 670 MiB of the evaluator's memory; a 16 GiB export could ask for terabytes)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            return all(entry.compress_type == zipfile.ZIP_STORED for entry in inner.infolist())
    except (zipfile.BadZipFile, ValueError):
        return False


@functools.cache
def program_specs() -> tuple[str, str]:
    """The input and output specs of model(idx) -> logits, as torch writes them."""
    import torch
    from torch.utils._pytree import tree_structure, treespec_dumps
    tensor = torch.zeros(1)
    return treespec_dumps(tree_structure(((tensor,), {}))), treespec_dumps(tree_structure(tensor))


def text_problem(item, key: str | None = None) -> str | None:
    """Text in a program's description other than plain names: torch writes its names (inputs, values,
    parameters, forward's arguments) into the Python source it generates for the module and runs, so a
    name like `idx=(code)` would be code. Node metadata (stack traces, module paths) is only read as text,
    and an operator's string argument is written quoted; the specs are compared whole (archive_problem)."""
    if isinstance(item, dict):
        for name, value in item.items():
            if name in ("metadata", "in_spec", "out_spec", "as_string"):
                continue
            if not PLAIN_NAME.fullmatch(name):
                return f"a name that is not a plain name ({name[:80]!r})"
            problem = text_problem(value, name)
            if problem:
                return problem
    elif isinstance(item, list):
        return next(filter(None, (text_problem(value, key) for value in item)), None)
    elif isinstance(item, str):
        if key == "expr_str":
            return None if plain_expression(item) else f"a symbolic size the loader would evaluate as code ({item[:80]})"
        if not (PLAIN_NAME.fullmatch(item) or (key == "as_float" and item in FLOAT_WORDS)
                or (key == "torch_version" and VERSION.fullmatch(item))):
            return f"text where a plain name goes ({item[:80]!r})"
    return None


def payload_problem(config: dict, kind: str, records: dict) -> str | None:
    """Why the tensors a config describes cannot be read as stored: pickles, or an empty record, which torch's
    loader fills with zeros of the declared size (any size, from a few bytes of archive)."""
    for entry in config.values():
        if entry.get("use_pickle") is not False:
            return f"{kind} stored as pickles (loading them would run what they hold)"
        sizes = [size.get("as_int") for size in entry["tensor_meta"]["sizes"]]
        if not all(isinstance(size, int) for size in sizes):
            return f"{kind} of sizes that are not numbers"
        record = records.get(f"data/{kind}/{entry['path_name']}")
        if record is None or (record.file_size == 0 and math.prod(sizes) > 0):
            return f"{kind} without their data ({entry['path_name']})"
    return None


def operator_problem(target) -> str | None:
    """Why the harness will not run an operator of a loaded program: only aten's dense operators it
    knows (DENSE_OPERATORS, and those torch tags pointwise), none that writes into a tensor (through
    its input the program could reach the targets it is scored on: set_, copy_) and none drawn at
    random. The rest of aten holds what the evaluator must not run outside the sandbox: memory it did
    not fill (empty, resize), sparse and nested constructors whose writes are not bounds-checked
    (a program wrote into the evaluator's heap), files (from_file, save)."""
    import torch
    if target is operator.getitem:
        return None
    if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"):
        return f"the program calls {target!r}, no operator the harness runs"
    name = target._schema.name.split("::")[-1]
    known = name in DENSE_OPERATORS or pointwise(name)
    if target._schema.is_mutable or not known:
        return (f"the program calls {target!r}, which the harness does not run: it runs dense aten operators that "
                "write into no tensor and draw nothing at random (nanochat/program_check.py's DENSE_OPERATORS, and "
                "the pointwise ones); express the model with those")
    for argument in target._schema.arguments:
        kind = str(argument.type)
        if "Storage" in kind or ("str" in kind and argument.name not in MODE_ARGUMENTS):
            return f"the program calls {target!r}, whose {argument.name} ({kind}) the harness does not pass"
    return None


@functools.cache
def pointwise(name: str) -> bool:
    """Whether torch tags an overload of aten's operator `name` pointwise (where.self is, where.ScalarSelf
    is not) and none drawn at random."""
    import torch
    packet = getattr(torch.ops.aten, name)
    tags = [set(getattr(packet, overload).tags) for overload in packet.overloads()]
    return any(torch.Tag.pointwise in t for t in tags) and not any(torch.Tag.nondeterministic_seeded in t for t in tags)


def checked_module(exported, tally: dict | None = None):
    """The loaded program's module, each attention call checked on the tensors it gets (attention_problem)
    before it runs: the shapes the archive notes are train.py's word, the tensors are what the kernel reads.
    With a tally, each product's multiply-adds are added to it as it runs (nanochat/flops_floor.py)."""
    from nanochat.flops_floor import PRODUCTS, counted
    module = exported.module()
    for node in module.graph.nodes:
        name = getattr(node.target, "_opname", None) if node.op == "call_function" else None
        if name == ATTENTION:
            node.target = checked_attention
        if tally is not None and name in PRODUCTS:
            node.target = counted(name, node.target, tally)
    module.recompile()
    return module


def checked_attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
    """aten's scaled_dot_product_attention, where its tensors are shapes its kernels read within (and
    nothing is dropped at random: the evaluator runs nothing drawn at random)."""
    import torch
    problem = attention_problem(query, key, value, attn_mask)
    if problem:
        raise ValueError(f"the program's attention takes {problem}: its kernel would read past their ends")
    if dropout_p:
        raise ValueError("the program's attention drops scores at random (dropout_p): the harness runs nothing random")
    return torch.ops.aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, *args, **kwargs)


def attention_problem(query, key, value, mask) -> str | None:
    """Why attention's kernels would read outside these tensors, or None: (..., heads, length, width) each,
    the same leading sizes, keys and values alike but their width, query heads a multiple of the keys'."""
    import torch
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in tensors) or len({t.dim() for t in tensors}) > 1:
        return "tensors of other ranks than (..., heads or length, length, width) alike"
    if key.shape[:-1] != value.shape[:-1] or query.shape[-1] != key.shape[-1] or query.shape[:-3] != key.shape[:-3]:
        return f"shapes that do not fit (query {list(query.shape)}, key {list(key.shape)}, value {list(value.shape)})"
    if query.dim() == 3 and query.size(0) != key.size(0) or key.size(-3) == 0 or query.size(-3) % key.size(-3):
        return f"heads that do not fit (query {list(query.shape)}, key {list(key.shape)})"
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return "tensors of different types or devices"
    scores = (*query.shape[:-1], key.size(-2))
    if mask is not None and (not isinstance(mask, torch.Tensor) or not broadcasts(mask.shape, scores)):
        return f"a mask of shape {list(getattr(mask, 'shape', []))} for scores of shape {list(scores)}"
    return None


def broadcasts(shape, to) -> bool:
    """Whether a tensor of shape `shape` broadcasts to exactly `to`."""
    import torch
    try:
        return tuple(torch.broadcast_shapes(shape, to)) == tuple(to)
    except RuntimeError:
        return False


def load_program(path: str):
    """The exported program in the file train.py wrote, loaded only where it holds nothing the loader
    would run as code (archive_problem), and never through the loader's fallbacks: its tensors with
    torch.load's weights_only always, and no legacy format. A refused archive raises ValueError."""
    import torch
    from torch.export.pt2_archive._package import PT2ArchiveReader, load_pt2
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as archive:  # the central directory: each record's size and compression
            records = {entry.filename.split("/", 1)[-1]: entry for entry in archive.infolist()}
        f.seek(0)
        problem = archive_problem(PT2ArchiveReader(f), records)
        if problem:
            raise ValueError(f"the archive holds {problem}")
        f.seek(0)
        # the loader's own torch.load calls, with weights_only forced; for this process only, which loads
        # one program at a time and nothing else meanwhile
        load = torch.load
        torch.load = lambda *a, weights_only=True, **k: load(*a, weights_only=True, **k)
        try:
            exported = load_pt2(f).exported_programs["model"]
        finally:
            torch.load = load
    for node in exported.graph_module.graph.nodes:
        problem = (operator_problem(node.target) or layout_problem(node)) if node.op == "call_function" else None
        if problem:
            raise ValueError(problem)
    return exported


def layout_problem(node) -> str | None:
    """Why a call's tensor layout is refused: the dense operators make sparse tensors when asked for one
    (a layout argument), and aten.full's sparse ones hold their indices in memory it did not fill (the
    allocator's: heap addresses), which sparse kernels read as offsets; the harness runs dense tensors only."""
    import torch
    from torch.utils._pytree import tree_leaves
    odd = [leaf for leaf in tree_leaves((node.args, node.kwargs)) if isinstance(leaf, torch.layout)
           and leaf != torch.strided]
    return f"the program calls {node.target!r} for a {odd[0]} tensor: the harness runs dense tensors only" if odd \
        else None
