"""What both sides share, and nothing else: the trust boundary's one crossing.

The owner's side (``owner_console``) imports from the kernel's package only
this package; this package imports neither side (``lint-imports`` checks it,
see the ``[importlinter]`` contracts in setup.cfg).

- :mod:`.plan`: the plan format: frame operations, expression kinds and
  functions with their semantics, validation tables, the canonical form and
  its hash.
- :mod:`.protocol`: the wire envelope, the request and reply kinds, and the
  typed errors with their public fields.
- :mod:`.plan_text`: a plan as polars-shaped text and as a tree (the owner's
  review, the scientist's inspection).
- :mod:`.local`: the plan's expression tables compiled to polars (the
  kernel's local frames; the executor's compiler with its own overrides).
"""
