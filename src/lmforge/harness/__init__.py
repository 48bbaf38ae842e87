"""lm-evaluation-harness as lmforge's evaluation runner.

- :mod:`lmforge.harness.lm`: our engine and tokenizer as an ``lm_eval`` ``LM``;
- ``tasks/``: the bundled task configs (preference multiple choice, held-out language modelling,
  the verifiable task), reading the ingested held-out splits;
- :mod:`lmforge.harness.run`: runs them in process (the evaluate stage) and reads the results back,
  each figure with its 95% interval over the task's items.

The same task configs run against the served model with the harness's own CLI (README: "Evaluate
with lm-evaluation-harness"). An edge module: it needs ``lm_eval``, which the training core does not.
"""
