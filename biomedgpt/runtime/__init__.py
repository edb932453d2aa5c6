"""What every process of a distributed job needs, whatever it trains or reads: the launcher's variables in the
names torch and mosaicml-streaming read, small collectives on host values, stop requests agreed on by all ranks,
and the clean-up of the shared memory that killed runs leave behind. Used by :mod:`biomedgpt.data` and
:mod:`biomedgpt.train`; it imports neither.
"""

from biomedgpt.runtime.launcher_env import DistributedEnv, apply_distributed_env, detect_distributed_env

__all__ = ["DistributedEnv", "apply_distributed_env", "detect_distributed_env"]
