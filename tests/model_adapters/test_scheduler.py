"""The engine's scheduler (runtime/scheduler.py), alone: which sample of which request takes which slot, in what order,
and when a request waits. Plain Python: the engine's tests check the same through real decoding."""

from nsa_eval.model_adapters.base import GenerationRequest
from nsa_eval.model_adapters.runtime.scheduler import RequestState, DecodingSample, Scheduler


def request(index, length, n=1, budget=4):
    asked = GenerationRequest("p", max_new_tokens=budget, temperature=1.0 if n > 1 else 0.0, n=n)
    return RequestState(index, asked, [0] * length, False, list(range(n)), n)


def start_all(scheduler, fits=lambda r: True, finish_at_once=()):
    """Run every admission as the engine does (a sample is taken, the sample placed unless it finished at once)."""
    taken = []
    for admission in scheduler.admit(fits):
        sample = admission.request.to_start.pop(0)
        taken.append((admission.slot, admission.request.index, sample, admission.stage, admission.from_staging))
        if admission.request.index not in finish_at_once:
            scheduler.place(admission.slot, DecodingSample(admission.request, sample))
    return taken


def test_a_wave_goes_longest_first_and_later_arrivals_after_every_waiting_request():
    scheduler = Scheduler(2)
    for index, length in enumerate([5, 9, 7, 9]):
        scheduler.add(request(index, length))
    # longest first; of equal lengths the later added first (a stable sort taken from its end)
    assert start_all(scheduler) == [(0, 3, 0, False, False), (1, 1, 0, False, False)]
    scheduler.add(request(4, 100))  # arrives once the wave has started: after 2 and 0, however long
    scheduler.release(0)
    scheduler.release(1)
    assert [index for _, index, *_ in start_all(scheduler)] == [2, 0]
    scheduler.release(0)
    assert [index for _, index, *_ in start_all(scheduler)] == [4]


def test_n_samples_go_through_the_staging_slot_and_a_finished_sample_frees_its_slot_at_once():
    scheduler = Scheduler(2)
    scheduler.add(request(0, 3, n=3))
    scheduler.add(request(1, 2))
    taken = start_all(scheduler, finish_at_once={0})  # every sample of 0 finishes on its first token
    # the prompt is staged once; its samples copy it into slot 0 one after another, then 1 takes slot 0 and ...
    assert taken == [(0, 0, 0, True, True), (0, 0, 1, False, True), (0, 0, 2, False, True), (0, 1, 0, False, False)]
    assert scheduler.staged is None and scheduler.busy() == [0] and not scheduler.waiting


def test_a_request_that_does_not_fit_waits_with_those_behind_it():
    scheduler = Scheduler(4)
    scheduler.add(request(0, 10))
    scheduler.add(request(1, 50))
    scheduler.add(request(2, 5))
    assert start_all(scheduler, fits=lambda r: r.positions <= 20) == []  # 1 is first and does not fit
    assert not scheduler.idle() and not scheduler.busy()
    assert [index for _, index, *_ in start_all(scheduler, fits=lambda r: r.positions <= 60)] == [1, 0, 2]


def test_bucket_and_resize():
    scheduler = Scheduler(8)
    for index in range(3):
        scheduler.add(request(index, 4))
    start_all(scheduler)
    assert scheduler.bucket() == 4  # slots 0-2 busy: the next power of two above slot 2
    scheduler.release(2)
    assert scheduler.bucket() == 2
    for slot in scheduler.busy():
        scheduler.release(slot)
    assert scheduler.idle()
    scheduler.resize(3)
    assert scheduler.slots == 3 and scheduler.decoding == [None] * 3
