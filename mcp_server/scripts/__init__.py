"""Scripts that run a run: worker.py (one run under a hard timeout and a process-tree kill, with the
harness's separate evaluation), node.py (a cluster node's side: sync, prepare, train, one result line)
sandbox.py (the bubblewrap / sandbox-exec command line), inotify_events.py (the events of an
inotify descriptor), process_tree.py (a run's processes, signalled and reaped) and compile_programs.py (the
compile cache kept per program).

Standard library only, and they import nothing from the package but each other: cluster.package
copies them beside a candidate's code, where a bare Python runs them, and the server starts
worker.py as a script.

Imports from the package: nothing.
"""
