"""See the result: the mapping report (``censusvi report``) and the explorer page of the Serve app."""
