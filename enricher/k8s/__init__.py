"""The Kubernetes watcher (`flowtally watch-k8s`): cluster objects -> the identity topic.

:mod:`enricher.k8s.objects` is the pure core (Kubernetes objects as dicts + times -> per-address
version lists), :mod:`enricher.k8s.watcher` the list/watch shell around the ``kubernetes``
client, :mod:`enricher.k8s.service` the stage (Kafka, metrics, lifecycle).
"""
