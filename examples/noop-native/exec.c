/* The latency suite's native no-op: an OpenWhisk actionloop executable. For each
 * activation it reads one JSON line on stdin and answers `{}` as one line on
 * descriptor 3. Built by the suite with `cc -O2 -o exec exec.c`. */
#include <stdio.h>
#include <string.h>

int main(void) {
    FILE *answers = fdopen(3, "w");
    if (answers == NULL) {
        perror("fdopen(3)");
        return 1;
    }
    static char line[1 << 20];
    while (fgets(line, sizeof line, stdin) != NULL) {
        /* Drain the rest of a line longer than the buffer. */
        while (strchr(line, '\n') == NULL && fgets(line, sizeof line, stdin) != NULL) {
        }
        fputs("{}\n", answers);
        fflush(answers);
    }
    return 0;
}
