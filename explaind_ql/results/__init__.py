"""From engine results to what users read: frames (:mod:`.frames`), output formats (:mod:`.formats`) and
plots (:mod:`.plots`). Nothing is imported here, so that a shell loading formats does not load the engine."""
