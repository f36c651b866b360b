"""The course's grading engine.

Read it in this order: manifest (course.yml) -> build (stubs from solutions) -> submission
(intake and pre-flight checks) -> runner (one trusted pytest run per unit, learner code in a
sandboxed worker) -> scoring -> reporters.  The code that runs inside the worker lives in
``autograder.worker`` and imports nothing else from this package.
"""

__version__ = "0.1.0"
