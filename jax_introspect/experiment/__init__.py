"""The introspection experiment, built on the model side (`jax_introspect`), which never imports it.

- `protocols`: prompts, word lists, contrast pairs (data, each citing its source) and where each
  protocol's injection window starts;
- `vectors`: concept vectors; `sweep`: the sweep (its config, plan and run); `results`: trial
  records and the results folder;
- `grading`: the graders; `report`, `stats`: per-cell rates with intervals, markdown, heatmaps;
- `files`: atomic writes and the one-writer lock of a results folder.
"""
