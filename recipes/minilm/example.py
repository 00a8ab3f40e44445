name = "all_minilm_l6_v2"
example = [
    "fastDeploy serves machine learning models over HTTP.",
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps text to a fixed-size vector.",
    "How do I reset my password?",
    "Il pleut beaucoup aujourd'hui.",
    "Batching several requests together makes inference faster on CPU.",
]
