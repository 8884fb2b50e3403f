"""Infrastructure every stage uses and none of them owns: errors and exit codes, constants, input checks,
devices and dtypes (``hardware``), crash-safe files and journals (``store``), SIGTERM handling.

May import: nothing of persona's but ``persona.__version__`` (core sits below every stage).
"""
