"""The operations team's runbooks: the steps they take (``ops``) and running the playbooks of
runbooks/ through ansible-runner with a machine-readable summary (``runner``)."""
