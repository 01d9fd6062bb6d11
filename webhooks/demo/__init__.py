"""The quick start: demo agents (``agents``) and the pipeline ``agentrt demo`` runs
(``pipeline``). Both use only the public API, ``from runtime import ...``, as a user's
application would."""
