from .cli import main

# Guarded: multiprocessing's forkserver imports the parent's __main__ in the processes it
# starts (the signature verifier's worker), which must not run the CLI.
if __name__ == "__main__":
    main()
