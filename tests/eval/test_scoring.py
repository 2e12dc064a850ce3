"""The eval's answer checks."""

from __future__ import annotations

from node.eval.scoring import echoed_run, judge, named_terms

PLAYBOOK = "Every answer is two to four plain sentences in the engineer's own words."


def test_an_answer_that_repeats_eight_words_of_its_prompt_is_an_echo():
    answer = "Sure. Every answer is two to four plain sentences in my words."
    assert echoed_run(answer, [PLAYBOOK]) == "every answer is two to four plain sentences"


def test_seven_shared_words_are_not_an_echo():
    assert echoed_run("every answer is two to four plain lines", [PLAYBOOK]) is None


def test_terms_match_as_case_insensitive_stems():
    assert named_terms("Invalidate the TTL on writes.", ["invalidat", "ttl", "lock"]) == ["invalidat", "ttl"]


def test_a_verdict_needs_text_no_echo_and_a_subject_word_or_term():
    on_topic = judge("Use PostgreSQL for orders.", [PLAYBOOK], ["postgres"], ["transaction"])
    assert on_topic.passed and not on_topic.passed_on_terms
    assert judge("", [PLAYBOOK], ["postgres"], []).passed is False
    assert judge("Nothing relevant here.", [PLAYBOOK], ["postgres"], ["transaction"]).passed is False
    echo = judge(PLAYBOOK + " PostgreSQL.", [PLAYBOOK], ["postgres"], [])
    assert echo.echo is not None and not echo.passed
