"""TPU-vs-GPU parity: run a reference dump's prompts through jax_introspect and measure the gap.

A reference dump (written by `launch/gpu_reference.py` with PyTorch/transformers; format in
docs/parity.md) holds, per prompt, the residual stream after every decoder layer, the logits,
and a greedy continuation with its step logits, each clean and under every injection case,
plus Lindsey concept vectors. `measure_checkpoint` checks that the dump belongs to the same
model, tokenizer and prompts as the checkpoint (a clear `ParityError` otherwise), recomputes all
of it with jax_introspect in each requested dtype, and reports:

- per layer: residual max / mean |diff|, per-token relative error ||ours - ref|| / ||ref|| (max
  and mean over tokens), per-token cosine (min and mean); clean and injected rows separately;
- logits: max |diff|, mean KL(ref || ours) over positions, top-1 agreement, top-5 overlap
  (|top5 ours ∩ top5 ref| / 5, averaged over positions);
- concept vectors: cosine and relative error per word and layer;
- continuations: whether the greedy tokens are identical, the first index where they diverge,
  and the step logits compared up to and including that step (the contexts agree until then);
- the first layer where the difference jumps (the rule below).

The jump rule. e_l = the max over tokens of the per-token relative residual error after layer
l. Layer l is where the difference jumps if it is the first with

    e_l >= floor   and   e_l >= factor * median(e_0 .. e_{l-1})     (for l = 0: e_0 >= floor)

defaults factor=10 and floor 1e-4 (float32) / 0.1 (bfloat16; also whenever the reference itself
ran in bfloat16 or float16). A correct float32 port sits
near 1e-6 everywhere, so a wrong weight or op stands out by orders of magnitude at its layer,
while bfloat16's round-off grows smoothly and crosses neither bar. When no layer jumps but the
logits do (their relative error passes the same two bars against the last layer's), the fault is
placed after the layers: the final norm or the LM head. Injected rows get the same rule
separately, so a fault only in the injection path shows up there alone. With a dump that saved
only some layers, the jump is located between the previous saved layer (exclusive) and the
reported one (inclusive).

Also here: summaries of the 405B replication's artifacts (judged JSON, torch `.pt` vectors) to
set a TPU run beside that GPU run; the judged trials and our results are read and counted by the
experiment side's report loaders (`experiment.runs`, `experiment.aggregation`).

Modules, by job: `reference` (the dump and its checks), `measure` (the JAX side and the metrics),
`replication` (the 405B replication's artifacts), `output` (parity.json / .md / .png).
"""
from jax_introspect.parity.measure import (DTYPES, JUMP_FACTOR, JUMP_FLOOR, first_jump, locate, measure_checkpoint,
                                           measure_tensors, reference_summary, run_jax, summarize)
from jax_introspect.parity.output import plot, to_markdown, write_report
from jax_introspect.parity.reference import (FORMAT, META_FILE, OUTPUTS, TENSOR_FILE, ParityError, Reference,
                                             check_model, check_prompt_entries, check_reference, check_tokenizer,
                                             prompt_token_ids, read_reference, validate_reference)
from jax_introspect.parity.replication import (our_results_summary, pt_to_concept_vectors, read_pt_vectors,
                                               replication_summary, replication_vectors_summary)

__all__ = ["DTYPES", "FORMAT", "JUMP_FACTOR", "JUMP_FLOOR", "META_FILE", "OUTPUTS", "TENSOR_FILE", "ParityError",
           "Reference", "check_model", "check_prompt_entries", "check_reference", "check_tokenizer", "first_jump",
           "locate", "measure_checkpoint", "measure_tensors", "our_results_summary", "plot", "prompt_token_ids",
           "pt_to_concept_vectors", "read_pt_vectors", "read_reference", "reference_summary", "replication_summary",
           "replication_vectors_summary", "run_jax", "summarize", "to_markdown", "validate_reference", "write_report"]
