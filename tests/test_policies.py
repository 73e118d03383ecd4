"""Policies as pure decision logic: synthetic header snapshots, a fake clock, no MPI."""

import pytest

from aau_mpi.base.errors import UserError
from aau_mpi.comm.header import empty_headers
from aau_mpi.algorithms.policies import build_policy
from aau_mpi.algorithms.graphs import Graph, generate

RING = generate("ring", 4)          # rank 0 reads from ranks 1 and 3
STAR = generate("star", 5)          # rank 0 (the hub) reads from ranks 1..4


def snapshot(graph, rank, slots=1, **fields):
    """Headers for `rank`'s in-neighbours; fields given as {name: [per neighbour]}."""
    headers = empty_headers(len(graph.in_neighbours(rank)), slots, graph.n)
    for name, values in fields.items():
        headers[name][:, 0] = values
    return headers


def deposit(headers, j, time, iteration=None, slot=0, seen_by=None):
    """Neighbour j makes one more deposit into `slot` at `time`.

    `seen_by`: a policy that polls between deposits (so it measures intervals).
    """
    headers["seq"][j, slot] += 1
    headers["time"][j, slot] = time
    headers["iteration"][j, slot] = headers["seq"][j, slot] if iteration is None else iteration
    if seen_by is not None:
        seen_by.observe(headers)


def use(policy, headers, selection, k):
    policy.mixed([(j, s, headers[j, s]) for j, s in selection.slots], k)


# ---- aau -------------------------------------------------------------------

def test_aau_with_gamma_zero_returns_at_once_when_one_neighbour_is_fresh():
    aau = build_policy("aau", STAR, 0)
    headers = snapshot(STAR, 0)
    assert aau.select(headers, 0, now=0.0) is None, "rule 1: wait for one fresh neighbour"
    deposit(headers, 2, time=0.1)
    selection = aau.select(headers, 0, now=0.1)
    assert selection.slots == [(2, 0)]
    assert selection.weights == [0.5] and selection.self_weight == 0.5


def test_aau_waits_for_a_neighbour_whose_staleness_reached_tau():
    aau = build_policy("aau", STAR, 0, {"tau": 3})
    headers = snapshot(STAR, 0)
    for k in range(3):  # neighbours 1..3 fast and used each iteration; 0 never deposits
        for j in (1, 2, 3):
            deposit(headers, j, time=k + 0.5)
        selection = aau.select(headers, k, now=k + 0.5)
        assert selection is not None and (0, 0) not in selection.slots
        use(aau, headers, selection, k)
    for j in (1, 2, 3):
        deposit(headers, j, time=3.5)
    assert aau.select(headers, 3, now=3.5) is None, "neighbour 0 unused for tau iterations"
    deposit(headers, 0, time=3.9)
    selection = aau.select(headers, 3, now=3.9)
    assert (0, 0) in selection.slots and len(selection.slots) == 4


def test_aau_never_waits_for_a_done_neighbour():
    aau = build_policy("aau", STAR, 0, {"tau": 1})
    headers = snapshot(STAR, 0, done=[1, 0, 1, 1])
    assert aau.select(headers, 5, now=1.0) is None, "the live neighbour is overdue"
    deposit(headers, 1, time=1.1)
    assert aau.select(headers, 5, now=1.1).slots == [(1, 0)]
    headers["done"][1, 0] = 1
    all_done = aau.select(headers, 6, now=1.2)
    assert all_done is not None, "every neighbour done: continue alone"


def test_aau_waits_within_its_budget_for_a_neighbour_predicted_to_arrive():
    aau = build_policy("aau", RING, 0, {"gamma": 0.5})
    aau.computed(1.0)  # own compute takes 1 s: budget 0.5 s
    headers = snapshot(RING, 0)
    # Rank 1 (neighbour 0) deposits at 0, 1, 2: next due at 3.0.
    for t0, t1 in ((0.0, 0.7), (1.0, 1.7), (2.0, None)):
        deposit(headers, 0, time=t0, seen_by=aau)
        if t1 is not None:
            deposit(headers, 1, time=t1, seen_by=aau)
    use(aau, headers, aau.uniform([0, 1]), 0)
    deposit(headers, 1, time=2.7, seen_by=aau)  # rank 3 fresh at 2.7
    assert aau.select(headers, 1, now=2.7) is None, "rank 1 is due at 3.0, within the budget"
    assert aau.select(headers, 1, now=2.9) is None
    deposit(headers, 0, time=3.0, seen_by=aau)
    assert sorted(aau.select(headers, 1, now=3.0).slots) == [(0, 0), (1, 0)]


def test_aau_skips_a_neighbour_predicted_beyond_its_budget():
    aau = build_policy("aau", RING, 0, {"gamma": 0.5})
    aau.computed(1.0)
    headers = snapshot(RING, 0)
    for t in (0.0, 10.0):
        deposit(headers, 1, time=t, seen_by=aau)  # rank 3: every 10 s, next due at 20
    for t in (9.0, 10.0, 11.0):
        deposit(headers, 0, time=t, seen_by=aau)  # rank 1: every second
    use(aau, headers, aau.uniform([0, 1]), 0)
    deposit(headers, 0, time=12.0, seen_by=aau)
    assert aau.select(headers, 1, now=12.0).slots == [(0, 0)], "rank 3 is not due within 0.5 s"


def test_aau_stops_waiting_for_a_neighbour_that_is_already_late():
    """Rule 3 waits for arrivals predicted between now and the budget's end:
    a neighbour whose predicted deposit is already past is late, and waiting
    for it would burn the whole budget every iteration (review finding 2)."""
    aau = build_policy("aau", RING, 0, {"gamma": 0.5})
    aau.computed(1.0)
    headers = snapshot(RING, 0)
    for t in (0.0, 1.0):
        deposit(headers, 0, time=t, seen_by=aau)
        deposit(headers, 1, time=t, seen_by=aau)
    use(aau, headers, aau.uniform([0, 1]), 0)
    deposit(headers, 0, time=1.9, seen_by=aau)  # rank 3 is due at 2.0 but never comes
    assert aau.select(headers, 1, now=1.9) is None, "rank 3 is due within the budget"
    assert aau.select(headers, 1, now=2.05).slots == [(0, 0)], "rank 3 is late: go on"


@pytest.mark.parametrize("own,neighbours,expected", [
    (0.1, [0.1, 0.1], 1.0),      # as fast as the others: plain step
    (0.3, [0.1, 0.1], 3.0),      # 3x slower: 3x step
    (1.0, [0.1, 0.1], 4.0),      # 10x slower: clipped at c = 4
    (0.05, [0.1, 0.1], 1.0),     # faster than the others: never below 1
    (0.3, [0.1, 0.2], 2.0),      # median of the neighbours' intervals
])
def test_aau_step_scale_is_clip_of_own_over_median_interval(own, neighbours, expected):
    aau = build_policy("aau", RING, 0, {"rate_scaled": True})
    aau.deposited(0.0)
    aau.deposited(own)
    headers = snapshot(RING, 0)
    for j, interval in enumerate(neighbours):
        deposit(headers, j, time=0.0, seen_by=aau)
        deposit(headers, j, time=interval, seen_by=aau)
    assert aau.step_scale() == pytest.approx(expected)
    assert build_policy("aau", RING, 0).step_scale() == 1.0, "off by default"


# ---- baselines -----------------------------------------------------------

def test_dpsgd_waits_for_every_live_neighbour_at_iteration_k_by_parity():
    dpsgd = build_policy("dpsgd", RING, 0)
    headers = empty_headers(2, 2, 4)
    deposit(headers, 0, time=0.0, iteration=0, slot=0)
    assert dpsgd.select(headers, 0, now=0.0) is None
    deposit(headers, 1, time=0.0, iteration=0, slot=0)
    deposit(headers, 0, time=0.1, iteration=1, slot=1)  # a neighbour already at k+1
    selection = dpsgd.select(headers, 0, now=0.1)
    assert selection.slots == [(0, 0), (1, 0)]
    assert selection.weights == pytest.approx([1 / 3, 1 / 3])  # Metropolis-Hastings on a ring
    assert selection.self_weight == pytest.approx(1 / 3)
    use(dpsgd, headers, selection, 0)
    assert dpsgd.select(headers, 1, now=0.2) is None, "rank 3's iteration 1 is missing"
    headers["done"][1, 0] = 1
    selection = dpsgd.select(headers, 1, now=0.2)
    assert selection.slots == [(0, 1)] and selection.self_weight == pytest.approx(2 / 3)


DIRECTED = generate("exponential", 4, {"directed": True})  # i -> i+1, i+2: 0 reads 2 and 3


def test_dpsgd_keeps_a_slot_per_round_a_directed_neighbour_runs_ahead():
    """Rank 3 hears from rank 0 only over 0 -> 2 -> 3, so its iterations 1 and 2
    can come before rank 0 reads its iteration 0: three slots, by k mod 3, keep
    all of them (with two, iteration 2 replaced 0 and rank 0 waited for ever)."""
    dpsgd = build_policy("dpsgd", DIRECTED, 0)
    assert dpsgd.slots_per_neighbour == 3 == DIRECTED.rounds_in_flight
    assert [dpsgd.deposit_slot(k) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert build_policy("dpsgd", RING, 0).slots_per_neighbour == 2
    headers = empty_headers(2, 3, 4)  # neighbour 0 is rank 2, neighbour 1 is rank 3
    for k in range(3):
        deposit(headers, 1, time=0.0, iteration=k, slot=k)
    assert dpsgd.select(headers, 0, now=0.0) is None, "rank 2's iteration 0 is missing"
    deposit(headers, 0, time=0.0, iteration=0, slot=0)
    selection = dpsgd.select(headers, 0, now=0.0)
    assert selection.slots == [(0, 0), (1, 0)]
    assert selection.weights == [1 / 3, 1 / 3]  # uniform over 2 in-neighbours and itself
    assert selection.self_weight == pytest.approx(1 / 3)
    use(dpsgd, headers, selection, 0)
    deposit(headers, 0, time=0.1, iteration=1, slot=1)
    assert dpsgd.select(headers, 1, now=0.1).slots == [(0, 1), (1, 1)]


def test_dpsgd_refuses_a_graph_where_a_writer_never_waits_for_its_reader():
    with pytest.raises(UserError, match="no path of edges leads back from 1 to 0") as error:
        build_policy("dpsgd", Graph(3, [(0, 1), (1, 2)], directed=True), 1)
    assert "\n" not in str(error.value)


def test_async_never_waits_and_mixes_latest_deposits_uniformly():
    policy = build_policy("async", STAR, 0)
    headers = snapshot(STAR, 0)
    assert policy.select(headers, 0, now=0.0).slots == []
    deposit(headers, 1, time=0.0)
    deposit(headers, 3, time=0.0)
    first = policy.select(headers, 0, now=0.0)
    use(policy, headers, first, 0)
    again = policy.select(headers, 1, now=0.0)  # nothing fresh: stale copies still mixed
    assert again.slots == [(1, 0), (3, 0)] and again.weights == [1 / 3, 1 / 3]


def test_async_one_picks_one_deposited_neighbour_with_weight_half():
    policy = build_policy("async_one", STAR, 0, {"seed": 3})
    headers = snapshot(STAR, 0)
    deposit(headers, 0, time=0.0)
    deposit(headers, 2, time=0.0)
    picks = {policy.select(headers, k, now=0.0).slots[0] for k in range(50)}
    assert picks == {(0, 0), (2, 0)}
    assert policy.select(headers, 0, now=0.0).weights == [0.5]


def test_fixed_k_waits_for_k_fresh_neighbours_and_takes_the_newest_k():
    policy = build_policy("fixed_k", STAR, 0, {"k": 2})
    headers = snapshot(STAR, 0)
    deposit(headers, 3, time=0.3)
    assert policy.select(headers, 0, now=0.3) is None
    deposit(headers, 1, time=0.2)
    deposit(headers, 0, time=0.4)
    selection = policy.select(headers, 0, now=0.4)
    assert selection.slots == [(0, 0), (3, 0)], "the two newest deposits (review finding 4)"
    use(policy, headers, policy.uniform([0, 1, 3]), 0)
    headers["done"][:3, 0] = 1  # one live neighbour left: k is capped at 1
    deposit(headers, 3, time=0.5)
    assert policy.select(headers, 1, now=0.5).slots == [(3, 0)]


def test_unknown_policy_or_parameter_is_a_one_line_user_error():
    with pytest.raises(UserError, match="did you mean 'aau'"):
        build_policy("aua", RING, 0)
    with pytest.raises(UserError, match="did you mean 'tau'"):
        build_policy("aau", RING, 0, {"taus": 3})


@pytest.mark.parametrize("name,params,field", [
    ("aau", {"tau": 0}, "policy.tau"), ("aau", {"tau": 2.5}, "policy.tau"),
    ("aau", {"gamma": -1}, "policy.gamma"), ("aau", {"max_scale": 0.5}, "policy.max_scale"),
    ("aau", {"rate_scaled": "yes"}, "policy.rate_scaled"), ("fixed_k", {"k": 0}, "policy.k"),
])
def test_out_of_range_parameters_name_their_field(name, params, field):
    with pytest.raises(UserError, match=field):
        build_policy(name, RING, 0, params)


def test_state_round_trips_through_json_and_resets_sequence_numbers():
    """A resumed policy keeps its last use and timing estimates; its new
    mailbox starts from seq 0, so nothing counts as seen."""
    import json
    policy = build_policy("aau", RING, 0, {"tau": 3, "rate_scaled": True})
    headers = snapshot(RING, 0)
    for t in range(1, 6):
        deposit(headers, 0, time=t * 0.1, seen_by=policy)
        deposit(headers, 1, time=t * 0.3, seen_by=policy)
    policy.deposited(1.0)
    policy.deposited(1.2)
    policy.computed(0.05)
    use(policy, headers, policy.select(headers, 7, now=2.0), 7)
    state = json.loads(json.dumps(policy.state_dict()))

    resumed = build_policy("aau", RING, 0, {"tau": 3, "rate_scaled": True})
    resumed.load_state_dict(state)
    assert resumed.last_used.tolist() == policy.last_used.tolist() == [7, 7]
    assert resumed.interval == pytest.approx(policy.interval)
    assert resumed.step_scale() == policy.step_scale()
    assert resumed.last_seq.sum() == 0
    fresh = snapshot(RING, 0)
    deposit(fresh, 1, time=3.0)
    assert resumed.select(fresh, 8, now=3.0).slots == [(1, 0)]


def test_async_one_resumes_its_random_choices():
    policy = build_policy("async_one", STAR, 0, {"seed": 3})
    headers = snapshot(STAR, 0, seq=[1, 1, 1, 1])
    policy.select(headers, 0, now=0.0)
    resumed = build_policy("async_one", STAR, 0, {"seed": 3})
    resumed.load_state_dict(policy.state_dict())
    assert [policy.select(headers, k, 0.0).slots for k in range(10)] == \
        [resumed.select(headers, k, 0.0).slots for k in range(10)]


# ---- liveness, clocks, time-varying graphs (review findings 1 and 3) ---------

@pytest.mark.parametrize("name", ["async", "async_one"])
def test_wait_free_policies_stop_mixing_finished_and_stalled_neighbours(name):
    """A finished rank's last model, or a stalled one's, must not keep its weight for ever."""
    policy = build_policy(name, STAR, 0)
    headers = snapshot(STAR, 0)
    for j in range(4):
        deposit(headers, j, time=0.0)
    headers["done"][1, 0] = 1                      # rank 2 finished
    policy.skip([2], headers)                      # rank 3 stalled (the watchdog said so)
    mixed = {j for k in range(40) for j, _ in policy.select(headers, k, now=1.0).slots}
    assert mixed == {0, 3}, "only the live neighbours are mixed"
    deposit(headers, 2, time=2.0)                  # the stalled one deposits again: live again
    mixed = {j for k in range(40) for j, _ in policy.select(headers, k, now=2.0).slots}
    assert mixed == {0, 2, 3}


def test_intervals_are_per_iteration_of_the_sender_and_from_its_own_times():
    """A sender that deposits here every 3rd of its iterations (a time-varying graph)
    has the same seconds per iteration as one that deposits every iteration."""
    every, third = build_policy("aau", RING, 0), build_policy("aau", RING, 0)
    a, b = snapshot(RING, 0), snapshot(RING, 0)
    for n in range(1, 5):
        deposit(a, 0, time=0.1 * n, iteration=n, seen_by=every)
        deposit(b, 0, time=0.3 * n, iteration=3 * n, seen_by=third)
    assert every.interval[0] == pytest.approx(0.1) and third.interval[0] == pytest.approx(0.1)


ONE_PEER = generate("exponential_one_peer", 8)   # period 3: hops 1, 2, 4


def test_dpsgd_on_the_one_peer_graph_waits_for_the_one_active_neighbour():
    dpsgd = build_policy("dpsgd", ONE_PEER, 0)
    assert ONE_PEER.in_neighbours(0) == [4, 6, 7] and dpsgd.slots_per_neighbour == 2
    headers = empty_headers(3, 2, 8)
    for k, sender in ((0, 7), (1, 6), (2, 4), (3, 7)):
        assert ONE_PEER.active_in(0, k) == [sender]
        j = ONE_PEER.in_neighbours(0).index(sender)
        slot = dpsgd.deposit_slot(k)
        assert slot == (k // 3) % 2
        assert dpsgd.select(headers, k, now=0.0) is None
        deposit(headers, j, time=0.0, iteration=k, slot=slot)
        selection = dpsgd.select(headers, k, now=0.0)
        assert selection.slots == [(j, slot)] and selection.weights == [0.5]
        assert selection.self_weight == 0.5
        use(dpsgd, headers, selection, k)


def test_aau_staleness_bound_counts_rounds_of_a_time_varying_graph():
    """On the one-peer graph each neighbour deposits here once per period (3
    iterations), so tau rounds are 3 tau iterations: a neighbour is only waited
    for once it has been unused that long."""
    aau = build_policy("aau", ONE_PEER, 0, {"tau": 2})
    headers = empty_headers(3, 1, 8)
    deposit(headers, 0, time=0.0)
    for k in range(6):  # only neighbour 0 (rank 4) ever deposits
        deposit(headers, 0, time=0.1 * (k + 1))
        selection = aau.select(headers, k, now=0.1 * (k + 1))
        assert selection is not None, f"iteration {k}: nobody unused for 2 rounds (6 its) yet"
        use(aau, headers, selection, k)
    deposit(headers, 0, time=1.0)
    assert aau.select(headers, 6, now=1.0) is None, "ranks 6 and 7 unused for 2 rounds"


def test_aau_needs_one_fresh_neighbour_a_round_of_a_time_varying_graph():
    """One deposit arrives per iteration on the one-peer graph: a rank that
    averaged two at once must not then wait at every iteration for the next
    (that chained the ranks' iterations: 69 % of the time waiting at 16 ranks)."""
    aau = build_policy("aau", ONE_PEER, 0)
    headers = empty_headers(3, 1, 8)
    deposit(headers, 0, time=0.0)
    deposit(headers, 1, time=0.0)
    selection = aau.select(headers, 0, now=0.0)
    assert sorted(selection.slots) == [(0, 0), (1, 0)]
    use(aau, headers, selection, 0)
    for k in (1, 2):  # mixed at 0: nothing fresh is needed within the round (3 its)
        selection = aau.select(headers, k, now=0.1 * k)
        assert selection.slots == [] and selection.self_weight == 1.0
        use(aau, headers, selection, k)
    assert aau.select(headers, 3, now=0.3) is None, "a round without a fresh neighbour"
    deposit(headers, 2, time=0.3)
    assert aau.select(headers, 3, now=0.3).slots == [(2, 0)]

    static = build_policy("aau", STAR, 0)   # period 1: one fresh neighbour every iteration
    headers = snapshot(STAR, 0)
    deposit(headers, 1, time=0.0)
    deposit(headers, 2, time=0.0)
    use(static, headers, static.select(headers, 0, now=0.0), 0)
    assert static.select(headers, 1, now=0.1) is None


def test_fixed_k_is_capped_at_the_neighbours_active_per_iteration():
    """Two fresh deposits per iteration never come on the one-peer graph (one
    arrives per iteration on average): waiting for them would slow every rank
    down without end (seen: a 50x straggler test that never finished)."""
    policy = build_policy("fixed_k", ONE_PEER, 0, {"k": 2})
    assert policy.k == 1
    assert build_policy("fixed_k", STAR, 0, {"k": 2}).k == 2
