"""Parses OpenMetrics text from stdin with the Prometheus project's own parser
(prometheus_client.openmetrics.parser, strict: it refuses text a Prometheus server would
refuse) and prints every sample as one JSON list of [name, labels, value]."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append([sample.name, sample.labels, sample.value])
print(json.dumps(samples))
