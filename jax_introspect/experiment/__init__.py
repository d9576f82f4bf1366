"""The introspection experiment, built on the model side (`jax_introspect`), which never imports it.

- `protocols`: prompts, word lists, contrast pairs (data, each citing its source) and where each
  protocol's injection window starts;
- `vectors`: concept vectors;
- `sweep_config`: `SweepConfig`, the sweep's fields declared once; `sweep`: plan and run;
  `results`: trial records and the results folder; `files`: atomic writes, one writer per folder;
- `grading`: the graders;
- the report, by job: `runs` (results folders and the replication's judged files -> rows),
  `aggregation` (cells, counts, Wilson intervals from `stats`, warnings), `render` (markdown,
  heatmaps), `report` (the report folder, written atomically).
"""
