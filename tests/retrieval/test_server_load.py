"""The retrieval server under load from a second process (launch/load_test_retrieval.py), a few
seconds of it: every request answered once with its own answer, bad ones refused with a message."""
from launch import load_test_retrieval


def test_a_few_seconds_of_load_lose_nothing(reference_dir):
    corpus = reference_dir / "r1searcher" / "corpus_samples" / "train_np_title_abs_sample_100.tsv"
    report = load_test_retrieval.main(["--clients", "6", "--seconds", "3", "--bad_every", "5",
                                       "--pool", "64", "--corpus", str(corpus)])
    assert report["errors"] == 0, report["first_errors"]
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["answered"] == report["requests"] >= 6
    # Each kind of bad request was sent and refused as expected (400, 413, 413) with a message.
    assert set(report["bad_requests_refused"]) == {"malformed_json", "oversized", "oversized_chunked"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
