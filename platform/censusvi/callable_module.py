"""``censusvi.annotate`` and ``censusvi.report`` are both a subpackage and an API function.

Python binds a subpackage to its parent's attribute once it is imported, so after any
``import censusvi.annotate.index`` the name ``censusvi.annotate`` is the subpackage, not the API
function. The subpackage's module is therefore made callable: calling it calls the API function
of the same name (``censusvi.api``), and its submodules stay reachable as before.
"""

from __future__ import annotations

import sys
import types


class CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from censusvi import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(name: str) -> None:
    """Let the module ``name`` (a subpackage of censusvi) be called as ``censusvi.api.<last part>``."""
    sys.modules[name].__class__ = CallableModule
