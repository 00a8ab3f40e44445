"""The large-file workload: the SHA-256 of each file, read in 1 MiB chunks (memory stays flat)."""
import hashlib


def predictor(inputs, batch_size=1):
    out = []
    for path in inputs:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        out.append(digest.hexdigest())
    return out
