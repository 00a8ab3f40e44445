name = "scaleout"
example = ["warmup"]
