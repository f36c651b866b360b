"""Code that runs on the learner's side of the boundary.

This package is all the sandboxed worker can see of the grader: the wire protocol, the worker
loop, the guards for forbidden shortcuts, and a few harness helpers.  It must not import any other
part of ``autograder`` (the hidden tests and the scorer are never mounted into the sandbox).
"""
