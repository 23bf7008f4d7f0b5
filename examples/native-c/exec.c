/* A native sprout function speaking OpenWhisk's actionloop protocol, in C.
 *
 * Build: cc -O2 -o exec exec.c   (the tests build it into a directory they register)
 * Run:   sprout invoke DIR --runtime native '{"name": "sprout"}'
 *
 * Each invocation is one JSON line on stdin: {"value": EVENT, "activation_id": ...,
 * "deadline": ..., ...}. The answer is one JSON line on descriptor 3. stdout and
 * stderr are the invocation's logs. The process stays up between invocations, so the
 * counter below counts the invocations this warm instance has served.
 *
 * Test hooks (by a word in the event): "allocate" touches memory until the sandbox's
 * limit stops it; "fork" starts children until the sandbox's pids limit stops it.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void answer(FILE *out, const char *json) {
    fprintf(out, "%s\n", json);
    fflush(out);
}

/* Starts sleeping children until fork fails; reports how many, and why it stopped. */
static void fork_until_refused(FILE *out) {
    pid_t kids[4096];
    int n = 0, err = 0;
    while (n < 4096) {
        pid_t pid = fork();
        if (pid == 0) {
            pause();
            _exit(0);
        }
        if (pid < 0) {
            err = errno;
            break;
        }
        kids[n++] = pid;
    }
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    char buf[128];
    snprintf(buf, sizeof buf, "{\"children\":%d,\"error\":\"%s\"}", n,
             err == EAGAIN ? "EAGAIN" : strerror(err));
    answer(out, buf);
}

int main(void) {
    FILE *out = fdopen(3, "w");
    if (out == NULL) {
        perror("fdopen(3)");
        return 1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long count = 0;
    while ((len = getline(&line, &cap, stdin)) > 0) {
        count++;
        if (line[len - 1] == '\n') line[--len] = '\0';
        printf("invocation %ld: %zd bytes in\n", count, len);
        fflush(stdout);
        fprintf(stderr, "stderr of invocation %ld\n", count);
        if (strstr(line, "\"allocate\"")) {
            for (;;) {
                char *p = malloc(1 << 20);
                if (p == NULL) break;
                memset(p, 1, 1 << 20);
            }
            answer(out, "\"allocation stopped\"");
            continue;
        }
        if (strstr(line, "\"fork\"")) {
            fork_until_refused(out);
            continue;
        }
        /* The result embeds the whole input line: it is JSON already. */
        fprintf(out, "{\"count\":%ld,\"input\":%s}\n", count, line);
        fflush(out);
    }
    free(line);
    return 0;
}
