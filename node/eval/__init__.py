"""`python -m node eval`: does each skill answer the question asked, on the model the node runs?

A question set per skill is kept as data (`skills/eval_questions.json`: questions no playbook
uses, each with key terms). The eval starts a real node serving every skill, asks each question
over A2A in a fresh context, and scores every answer (`node.eval.scoring`): non-empty, repeating
no 8-word run of its own prompt (instructions, playbook, question), naming a key term.
"""
