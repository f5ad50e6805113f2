/* inotify-watch DIR: prints "ready" once DIR is watched, then one line per inotify event in
 * DIR ("EVENT NAME"), flushed at once. The ConfigMap conformance test runs it in a container
 * (built static by the test: gcc -static -O2). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <unistd.h>

static const char *kind(unsigned m) {
    if (m & IN_CREATE) return "CREATE";
    if (m & IN_MOVED_TO) return "MOVED_TO";
    if (m & IN_MOVED_FROM) return "MOVED_FROM";
    if (m & IN_DELETE) return "DELETE";
    if (m & IN_CLOSE_WRITE) return "CLOSE_WRITE";
    if (m & IN_MODIFY) return "MODIFY";
    if (m & IN_ATTRIB) return "ATTRIB";
    if (m & IN_DELETE_SELF) return "DELETE_SELF";
    return "OTHER";
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: inotify-watch DIR\n");
        return 2;
    }
    int fd = inotify_init1(IN_CLOEXEC);
    if (fd < 0 || inotify_add_watch(fd, argv[1], IN_ALL_EVENTS) < 0) {
        perror(argv[1]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char buf[65536] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) return 1;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            printf("%s %s\n", kind(e->mask), e->len ? e->name : "");
            p += sizeof *e + e->len;
        }
    }
}
