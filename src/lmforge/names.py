"""Names shared across layers, once: a base module, so the parameters (their defaults), the
evaluation (which scores) and the registry (which decides) all read them without one importing the
other.

* the registered model's name and aliases;
* the figures a fixed judge scores (the held-out data, not a model of the version being judged),
  and which way is better: the ones a candidate is compared on with the champion, item by item.
"""

MODEL_NAME = "lmforge-chat"  # the registered model (params: registry.model_name)
CHAMPION = "champion"  # the alias that serves: moved only when every evaluation gate passes
CANDIDATE = "candidate"  # a version that failed a gate

FIXED_JUDGE = {
    "val_bits_per_byte": "lower",
    "val_text_bits_per_byte": "lower",  # per val document, every byte counted: any tokenizer
    "assistant_loss": "lower",
    "end_of_turn_rate": "higher",
    "task_accuracy": "higher",  # the verifiable task, checked by a program
}
# Figures that read the candidate's token ids (its val token shard, its per-token loss): comparable
# with a champion only when both have the same tokenizer. The others judge text and bytes.
TOKENIZER_BOUND = ("val_bits_per_byte", "assistant_loss")
