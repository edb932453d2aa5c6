from biomedgpt.runtime.process_exit import exit_without_teardown
from biomedgpt.train.cli import main

# A rank that returned from training skips the interpreter's teardown (2-3 s per rank; see process_exit). An
# exception still propagates as usual, with its traceback.
exit_without_teardown(main())
