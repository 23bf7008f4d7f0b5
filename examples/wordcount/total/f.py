def f(counts):
    return {"words": sum(counts), "chunks": len(counts)}
