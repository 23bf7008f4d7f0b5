# An OpenWhisk-style Python action: `main(args)` in `__main__.py`, returning a dict.
# Run it with: sprout invoke examples/owhello '{"name": "Alice"}' --handler __main__:main


def main(args):
    return {"greeting": "Hello, " + args.get("name", "stranger") + "!"}
