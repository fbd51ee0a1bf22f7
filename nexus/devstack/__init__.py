"""A developer's single-machine rack: private RabbitMQ and PostgreSQL servers, and the
supervision of the stack's processes, for ``nexusctl dev run-all`` (and the test harness).
"""
