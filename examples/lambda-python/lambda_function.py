"""An AWS Lambda-style Python function in FunctionBench's shape: a float-operation
microbenchmark (sin, cos, sqrt over N numbers) that reports its own latency.

    sprout invoke examples/lambda-python --handler lambda_function:lambda_handler '{"n": 100000}'

``context`` is sprout's Lambda context: function_name, function_version,
aws_request_id, memory_limit_in_mb, invoked_function_arn,
get_remaining_time_in_millis().
"""

import math
import time


def float_operations(n):
    start = time.perf_counter()
    total = 0.0
    for i in range(n):
        x = float(i)
        total += math.sin(x) * math.cos(x) + math.sqrt(x)
    return total, time.perf_counter() - start


def lambda_handler(event, context):
    n = int(event.get("n", 10000))
    total, latency = float_operations(n)
    return {
        "n": n,
        "total": total,
        "latency": latency,
        "request_id": context.aws_request_id,
        "function": context.function_name,
        "version": context.function_version,
        "memory_mb": context.memory_limit_in_mb,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
