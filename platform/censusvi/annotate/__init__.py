"""Label transfer: the reference index (``censusvi index``) and the annotation (``censusvi annotate``).

Calling this package, ``censusvi.annotate(adata, model=..., index=...)``, is ``censusvi.api.annotate``.
"""

from censusvi.callable_module import make_callable

make_callable(__name__)
