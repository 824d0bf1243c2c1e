"""End-to-end recipes that run both stages (stage one: pipeline/augment; stage two: trainer). They sit above
both packages so that stage two never imports teacher code (tests/test_layering.py)."""
