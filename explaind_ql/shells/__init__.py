"""The shells over the API: the ``explaind-ql`` CLI (:mod:`.cli`), its REPL (:mod:`.repl`) and the IPython
magic (:mod:`.ipython`). Nothing is imported here, so that ``explaind-ql --help`` stays fast."""
