"""placeholder, replaced below"""
def register(subparsers):
    pass
