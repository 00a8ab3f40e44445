"""What the API-key check costs a request: ``ApiKeys.owner`` with 0, 1 and 100 keys, timed in one process.

  python bench/keys_cost.py

Every key is compared, whichever matches (so a timing tells nothing of which), which is why
the cost grows with the number of keys. A W1 request costs about 500 µs end to end.
"""
import timeit

from fastdeploy.http.auth import ApiKeys


def main() -> None:
    keys = [f"bench-key-{i:04d}-0123456789abcdef" for i in range(100)]
    scope = {"headers": [(b"host", b"x"), (b"authorization", f"Bearer {keys[0]}".encode()),
                         (b"content-type", b"application/json")], "client": ("127.0.0.1", 5000)}
    for n in (0, 1, 100):
        checker = ApiKeys(",".join(keys[:n]))
        calls = 200_000
        best = min(timeit.repeat(lambda: checker.owner(scope), number=calls, repeat=5)) / calls
        print(f"{n:>3} keys: {best * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main()
