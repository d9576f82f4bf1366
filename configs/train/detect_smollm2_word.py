"""detect_smollm2_late with word-position concept vectors: the same adapter (LoRA r8 on wq/wk/wv/wo
of layers 15-29), data (129 concepts, the same 20 held out), windows and budget (200 steps of 8
examples, lr 2e-3); only the vectors and their strengths differ.

Why: on SmolLM2-135M, Lindsey's vectors (read at the token before the reply) carry little of the
word's identity. The base model never names the injected word with them, and its logit lens ranks
the word around 2000th (docs/readouts.md), so an adapter trained on them learns *that* something
was injected but not *which* concept (docs/training.md). Vectors read at the word's own last token
(`vector_position="word"`, `vectors.concept_vectors`) name the word in the base model's own answers
at strengths 0.75-1.5. They are about 4-8x stronger per unit strength, so strengths are drawn from
[0.5, 1.5] (the base model is still coherent in 13-14 of 16 answers at 0.75-1.0). Evaluate with the same
`--config.vector_position=word` (docs/training.md).
"""
import importlib.util
import os

_late_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detect_smollm2_late.py")
_spec = importlib.util.spec_from_file_location("detect_smollm2_late", _late_path)
_late = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_late)


def get_config():
    return _late.get_config().replace(vector_position="word", strength_range=(0.5, 1.5))
