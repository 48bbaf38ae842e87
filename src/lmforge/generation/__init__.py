"""Generation: everything that turns a model and a prompt into tokens, in one place.

* :mod:`.sampling_params`: what a request asks for (:class:`SamplingParams`);
* :mod:`.outputs`: what it gets back (:class:`Generation`, :class:`StreamChunk`);
* :mod:`.reply`: one reply's state while it grows (tokens, stops, the streamed text);
* :mod:`.logits`: logits processing with per-row knobs, the inverse-CDF draw and the seed rule;
* :mod:`.engine`: the continuous-batching engine, the one decode loop (with :mod:`.steps`: the
  forward passes and the draw of one iteration);
* :mod:`.interface`: the :class:`Engine` protocol, the typed :class:`Request`, the events and errors
  every engine shares;
* :mod:`.driver`: :func:`generate`, the engine run to completion on a batch (evaluation, RL
  rollouts, stage samples);
* :mod:`.chat`: the chat engine (chat template, stop tokens) over a model folder;
* :mod:`.introspect`: looking inside the model for the playground.

Training core: torch, tokenizers and the standard library only.
"""
