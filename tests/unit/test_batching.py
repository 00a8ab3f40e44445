from fastdeploy.batching import cycle_to, fill_wait_seconds, per_item_at, search_batch_size


def test_search_takes_the_smallest_size_near_the_best_time_per_input():
    # 10 ms fixed cost + 1 ms per input: per-input time keeps falling, gains shrink
    choice = search_batch_size(lambda n: 0.010 + 0.001 * n, 256)
    assert [size for size, _ in choice.trials] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert choice.batch_size == 128  # 1.08 ms per input, within 5 % of 256's 1.04 ms


def test_one_dip_does_not_end_the_search():
    throughput = {1: 215, 2: 400, 4: 560, 8: 698, 16: 655, 32: 786, 64: 873, 128: 910, 256: 897}
    choice = search_batch_size(lambda n: n / throughput[n], 256)
    assert choice.batch_size == 64  # 873/s is within 5 % of the best, 910/s at 128
    assert max(size for size, _ in choice.trials) == 256


def test_search_stops_when_batching_does_not_pay():
    choice = search_batch_size(lambda n: 0.005 * n, 256)  # no fixed cost: batching gains nothing
    assert choice.batch_size == 1
    assert len(choice.trials) == 3  # two doublings without a gain end it


def test_search_respects_the_cap_and_the_call_time_limit():
    assert search_batch_size(lambda n: 1e-6, 16).batch_size == 16
    slow = search_batch_size(lambda n: 1.0 + 0.1 * n, 1024, max_call_seconds=2.0)
    assert max(size for size, _ in slow.trials) == 16  # the first call over 2 s ends the search


def test_no_wait_when_idle_or_full():
    assert fill_wait_seconds(1, 32, 0.001, 0.5, busy=False) == 0.0
    assert fill_wait_seconds(32, 32, 0.001, 0.5, busy=True) == 0.0
    assert fill_wait_seconds(8, 32, 0.001, 0.0, busy=True) == 0.0


def test_wait_under_load_scales_with_missing_inputs():
    assert abs(fill_wait_seconds(8, 32, 0.001, 0.5, busy=True) - 0.012) < 1e-9


def test_cycle_to_repeats_the_example():
    assert cycle_to([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_no_wait_when_the_inputs_in_hand_already_run_near_the_best_time_per_input():
    flat = ((1, 0.0050), (2, 0.0049), (4, 0.0048), (8, 0.0048), (16, 0.0048))  # one thread: batching gains little
    assert fill_wait_seconds(4, 16, 0.0048, 0.5, busy=True, trials=flat) == 0.0
    assert fill_wait_seconds(1, 16, 0.0048, 0.5, busy=True, trials=flat) == 0.0  # 4 % off: within tolerance


def test_wait_when_a_fuller_batch_is_clearly_cheaper_per_input():
    steep = ((1, 0.0115), (2, 0.0080), (4, 0.0060), (8, 0.0048), (16, 0.0045))
    assert abs(fill_wait_seconds(2, 16, 0.0045, 0.5, busy=True, trials=steep) - 0.5 * 0.0045 * 14) < 1e-9
    assert fill_wait_seconds(8, 16, 0.0045, 0.5, busy=True, trials=steep) > 0.0  # 6.7 % slower than at 16
    assert fill_wait_seconds(12, 16, 0.0045, 0.5, busy=True, trials=steep) > 0.0  # measured size below it: 8


def test_per_item_at_uses_the_largest_measured_size_not_above():
    trials = ((1, 0.010), (4, 0.006), (16, 0.004))
    assert per_item_at(3, trials) == 0.010
    assert per_item_at(4, trials) == 0.006
    assert per_item_at(100, trials) == 0.004
