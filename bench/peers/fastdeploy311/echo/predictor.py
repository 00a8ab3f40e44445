"""W1 echo: returns its inputs unchanged (measures pure serving overhead)."""


def predictor(inputs, batch_size=1):
    return list(inputs)
