"""The numerical core: test-side path integrals, train-side optimizer terms, and their contraction."""
