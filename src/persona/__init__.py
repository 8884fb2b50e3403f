"""persona: find, monitor and control character traits of language models as persona vectors."""

__version__ = "0.1.0"

from persona.core.moved import install as _install_moved_modules  # noqa: E402

_install_moved_modules()  # old module paths (configs, notebooks) keep resolving, with a DeprecationWarning
