"""Analysis of the KV channel (issue 19): the restart ablation without the format confound, KV probes."""
