example = ["warmup"]
