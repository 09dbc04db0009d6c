"""`python -m converters.hf_to_jpaged SRC OUT` from a checkout: a thin command over
`jpaged.checkpoint` (installed as `jpaged convert SRC OUT`).

NOTE: not installed as a top-level package: a generic name like `converters` in site-packages
would clash with other projects; the installed entry point is `jpaged convert`.
"""
