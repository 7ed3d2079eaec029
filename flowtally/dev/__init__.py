"""Development tools, not part of any stage: the local Kafka broker (``localkafka``), the local
stack that runs the stages as processes (``localstack``), the demo (``demo``) and the synthetic
NetFlow and inventory generator (``generator``).

The CLI imports them lazily, only for their own commands (``flowtally kafka``, ``demo``,
``generate``); no stage imports them (tests/unit/test_dev_tools.py checks it).
"""
