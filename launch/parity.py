"""TPU-vs-GPU parity: jax_introspect beside a PyTorch/transformers reference (docs/parity.md).

    # a dump made on the GPU box with launch/gpu_reference.py
    python -m launch.parity --checkpoint=checkpoints/NAME --reference=DUMP --out=DIR
    # or run the reference here, in-process (needs torch + transformers)
    python -m launch.parity --checkpoint=checkpoints/NAME --hf_dir=HF_FOLDER [--device=cpu|cuda] \\
        [--prompts_file=P.json --words=Dust --layers=15 --strengths=4] --out=DIR
    # the 405B replication's artifacts beside our run
    python -m launch.parity --replication_json=shared/data/...judged.json \\
        [--replication_vectors=vector_love.pt,...] [--vectors=ours.npz] [--results=results/run] --out=DIR

Writes DIR/parity.json, DIR/parity.md and DIR/parity.png (per-layer error, log scale); with
--hf_dir also the dump it made, DIR/reference/. Exit status: 0 when the check ran, 2 on bad
input (the message names the problem), 1 when --fail_above is given and a float32 max |diff|
exceeds it.
"""
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "jax_introspect checkpoint (launch.convert output).")
    flags.DEFINE_string("reference", None, "Reference dump folder written by launch/gpu_reference.py.")
    flags.DEFINE_string("hf_dir", None, "HF model folder: make the reference here, in-process, instead.")
    flags.DEFINE_string("gguf_file", None, "With --hf_dir: the .gguf file inside it.")
    flags.DEFINE_string("device", "cpu", "With --hf_dir: torch device (cpu, cuda, cuda:N, auto).")
    flags.DEFINE_string("hf_dtype", "float32", "With --hf_dir: torch dtype of the reference model.")
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "jax_introspect dtypes to run.")
    flags.DEFINE_string("prompts_file", None, "Prompts JSON (gpu_reference format). With --reference it must match "
                        "the dump's prompts.")
    flags.DEFINE_string("words", "", "With --hf_dir: concept words (comma-separated or @file).")
    flags.DEFINE_string("baseline_words", "", "With --hf_dir: baseline words (default: gpu_reference's).")
    flags.DEFINE_string("template", "Tell me about {word}", "With --hf_dir: concept prompt template.")
    flags.DEFINE_string("vector_files", "", "With --hf_dir: .pt/.npz vectors to inject.")
    flags.DEFINE_string("layers", "", "With --hf_dir: injection layers.")
    flags.DEFINE_string("strengths", "", "With --hf_dir: injection strengths.")
    flags.DEFINE_enum("norm_match", "raw", ["raw", "mlp_out", "residual"],
                      "With --hf_dir: raw injection, or norm-matched to the layer's MLP output (vllm-lens 1.1.0, "
                      "the 405B replication's) or to the residual stream (vllm-lens >= 1.2.0).")
    flags.DEFINE_integer("inject_start", 0, "With --hf_dir: first injected position.")
    flags.DEFINE_integer("max_new_tokens", 16, "With --hf_dir: greedy continuation length.")
    flags.DEFINE_string("residual_layers", "", "With --hf_dir: layers whose residuals are kept (default all).")
    flags.DEFINE_integer("batch_size", 8, "Rows per jax_introspect call.")
    flags.DEFINE_float("jump_factor", 10.0, "Jump rule: factor over the median of preceding layers.")
    flags.DEFINE_float("jump_floor_float32", 1e-4, "Jump rule floor (relative error) for float32.")
    flags.DEFINE_float("jump_floor_bfloat16", 0.1, "Jump rule floor (relative error) for bfloat16.")
    flags.DEFINE_float("fail_above", None, "Exit 1 if a float32 residual or logit max |diff| exceeds this.")
    flags.DEFINE_string("replication_json", None, "The 405B replication's judged results JSON.")
    flags.DEFINE_string("replication_vectors", "", "Comma-separated .pt vector files of the replication.")
    flags.DEFINE_integer("replication_layer", None, "Layer of our vectors to set beside theirs (default: theirs).")
    flags.DEFINE_string("vectors", None, "Our ConceptVectors .npz, for cosine with the replication's vectors.")
    flags.DEFINE_string("results", None, "Our results folder (or its trials.jsonl), summarised beside the "
                        "replication's.")


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _make_reference(gpu_reference):
    from jax_introspect import parity
    model, tokenizer = gpu_reference.load_model(FLAGS.hf_dir, FLAGS.gguf_file, FLAGS.device, FLAGS.hf_dtype)
    meta, tensors = gpu_reference.build_reference(
        model, tokenizer, gpu_reference.read_prompts_file(FLAGS.prompts_file),
        words=gpu_reference.split_list(FLAGS.words), baseline_words=gpu_reference.split_list(FLAGS.baseline_words),
        template=FLAGS.template, vector_files=gpu_reference.split_list(FLAGS.vector_files),
        layers=gpu_reference.parse_numbers(FLAGS.layers, int, "layers"),
        strengths=gpu_reference.parse_numbers(FLAGS.strengths, float, "strengths"), norm_match=FLAGS.norm_match,
        inject_start=FLAGS.inject_start, max_new_tokens=FLAGS.max_new_tokens,
        residual_layers=gpu_reference.parse_numbers(FLAGS.residual_layers, int, "residual_layers") or None,
        device=FLAGS.device, dtype=FLAGS.hf_dtype, model_path=FLAGS.hf_dir, gguf_file=FLAGS.gguf_file, log=_log)
    del model
    folder = gpu_reference.write_dump(os.path.join(FLAGS.out, "reference"), meta, tensors)
    ref = parity.Reference(meta=meta, tensors=tensors, path=os.path.abspath(folder))
    parity.validate_reference(ref)
    return ref


def run() -> int:
    from jax_introspect import parity
    from launch import gpu_reference
    report = {}
    if FLAGS.reference or FLAGS.hf_dir:
        if bool(FLAGS.reference) == bool(FLAGS.hf_dir):
            raise parity.ParityError("pass --reference=DUMP or --hf_dir=DIR, not both")
        if not FLAGS.checkpoint:
            raise parity.ParityError("--checkpoint is required to check against a reference")
        if FLAGS.reference:
            ref = parity.read_reference(FLAGS.reference)
            if FLAGS.prompts_file:
                parity.check_prompt_entries(ref, gpu_reference.read_prompts_file(FLAGS.prompts_file))
        else:
            ref = _make_reference(gpu_reference)
        floors = {"float32": FLAGS.jump_floor_float32, "bfloat16": FLAGS.jump_floor_bfloat16}
        report = parity.measure_checkpoint(FLAGS.checkpoint, ref, FLAGS.dtypes, batch_size=FLAGS.batch_size,
                                           factor=FLAGS.jump_factor, floors=floors, log=_log)
    elif not (FLAGS.replication_json or FLAGS.replication_vectors or FLAGS.results):
        raise parity.ParityError("nothing to check: pass --reference or --hf_dir (with --checkpoint), or "
                                 "--replication_json / --replication_vectors / --results")
    if FLAGS.replication_json:
        report["replication"] = parity.replication_summary(FLAGS.replication_json)
    if FLAGS.results:
        report["our_results"] = parity.our_results_summary(FLAGS.results)
    if FLAGS.replication_vectors:
        ours = None
        if FLAGS.vectors:
            from jax_introspect.experiment.vectors import ConceptVectors
            if not os.path.isfile(FLAGS.vectors):
                raise parity.ParityError(f"--vectors={FLAGS.vectors} not found")
            ours = ConceptVectors.load(FLAGS.vectors)
        report["replication_vectors"] = parity.replication_vectors_summary(
            gpu_reference.split_list(FLAGS.replication_vectors), ours, FLAGS.replication_layer)
    paths = parity.write_report(report, FLAGS.out)
    for dtype, r in report.get("runs", {}).items():
        s = r["summary"]
        line = (f"{dtype}: residual max|diff| {s['residual_max_abs']:.2e} (rel {s['residual_rel_err_max']:.2e}), "
                f"logits max|diff| {s['logits_max_abs']:.2e}, KL {s['logits_kl_mean']:.2e}, top-1 {s['top1']:.4f}, "
                f"continuations identical {s['continuations_identical_count']}, first jump: {s['first_jump_where']}")
        if "injected_logits_max_abs" in s:
            line += (f"; injected: residual max|diff| {s['injected_residual_max_abs']:.2e}, logits max|diff| "
                     f"{s['injected_logits_max_abs']:.2e}, first jump: {s['injected_first_jump_where']}")
        if "concept_vector_cos_min" in s:
            line += f"; concept vectors cos min {s['concept_vector_cos_min']:.6f}"
        print(line)
    print("report: " + ", ".join(paths.values()))
    f32 = report.get("runs", {}).get("float32")
    if FLAGS.fail_above is not None and f32:
        s = f32["summary"]
        worst = max(s["residual_max_abs"], s["logits_max_abs"], s.get("injected_residual_max_abs", 0.0),
                    s.get("injected_logits_max_abs", 0.0))
        if worst > FLAGS.fail_above:
            print(f"FAIL: float32 max |diff| {worst:.2e} > --fail_above={FLAGS.fail_above:g}")
            return 1
    return 0


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jax_introspect import parity
    from launch import gpu_reference
    try:
        return run()
    except (parity.ParityError, gpu_reference.ReferenceError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # CheckpointError, InjectionError, ConfigError, the results' ReportError ...
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
