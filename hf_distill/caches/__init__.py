"""Teacher-logit caches: the teacher run once, its top-k log-probabilities stored for training without it.

- format.py           the columns, format versions and temperature rules every cache shares
- manifest.py         what a cache records about how it was built, and the check that a run matches it
- topk.py             one teacher's cache (causal LMs): build and load
- mixture.py          several teachers' mixture (causal LMs and classifiers)
- cross_tokenizer.py  a teacher with another tokenizer: its top k at the positions aligned with the student's

May import alignment/, storage/, training/ (the teacher's handling) and losses/; sources/ reads the caches.
"""
