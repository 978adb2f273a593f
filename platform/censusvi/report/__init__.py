"""See the result: the mapping report (``censusvi report``) and the explorer page of the Serve app.

Calling this package, ``censusvi.report(adata, index, out)``, is ``censusvi.api.report``.
"""

from censusvi.callable_module import make_callable

make_callable(__name__)
