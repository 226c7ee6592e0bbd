/* The pyunionfs command. A mount that daemonizes, or a container run, is handed to the fork
 * server (unionfs/forkserver) from here, so that neither waits for a Python interpreter to
 * start (17-18 ms of the ~28 ms a served mount took). Everything else, and whatever the server
 * is absent for or declines, goes to Python's command line, `PYTHON -P -m unionfs.cli ARGS`,
 * which does the work itself (-P: never a unionfs package from the working directory).
 *
 * This is the caller's side of the protocol (unionfs/forkserver/client.py has the same for
 * the launcher's attached mounts): the request as fields that each end with a NUL (no argument
 * or environment entry holds one): PROTOCOL, kind, umask, the served process's name and title
 * (empty here: the server makes them), the number of arguments, the arguments, then each
 * NAME=VALUE of the environment; with fds of the caller's working and root
 * directories, user and mount namespaces and stdio (SCM_RIGHTS). The server says "hello" once
 * it has checked who connected, then "go" with a pidfd of the process that took the request
 * on, or closes the connection (declined: nothing was done), after "retired" where this
 * caller's limits or priority are beyond its processes (it exits; this caller starts a new one,
 * which has them). The server's directory is
 * client.location()'s, named after the Python installation: PYUNIONFS_PYTHON's prefix and
 * PYTHONPATH (client.INSTALLATION). setup.py defines PYUNIONFS_PYTHON and PYUNIONFS_PREFIX. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROTOCOL 4                       /* client.PROTOCOL */
#define INITIAL_USER_NS 0xEFFFFFFDu      /* the kernel's PROC_USER_INIT_INO */
#define EXIT_LAUNCHER_ERROR 125          /* unionfs/errors.py */
#define TITLE_ROOM 8192                  /* environment a server needs for its forks' titles */

extern char **environ;

enum request { NONE, MOUNT, RUN };
static const char *const KIND[] = {[MOUNT] = "mount", [RUN] = "run"};
/* Mounts that stay in the foreground: their caller is their server. */
static const char *const FOREGROUND[] = {"-f", "-d", "--debug", "-h", "--help"};
/* The signals `pyunionfs run` passes on to the container (unionfs/errors.py FORWARDED_SIGNALS). */
static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};

static int launcher = -1;                  /* a pidfd of a served container's launcher */
static volatile sig_atomic_t forwarded = 0; /* the last signal passed on to it */

struct text {
    char *data;
    size_t length, capacity;
};

static void put(struct text *text, const char *data, size_t length)
{
    if (text->length + length > text->capacity) {
        text->capacity = 2 * (text->length + length);
        text->data = realloc(text->data, text->capacity);
        if (!text->data) {
            perror("pyunionfs");
            exit(1);
        }
    }
    memcpy(text->data + text->length, data, length);
    text->length += length;
}

/* STRING and its NUL: one field of the request. */
static void put_field(struct text *text, const char *string)
{
    put(text, string, strlen(string) + 1);
}

/* Python's command line, with the same arguments. */
static void __attribute__((noreturn)) run_python(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (args) {
        args[0] = PYUNIONFS_PYTHON;
        args[1] = "-P";
        args[2] = "-m";
        args[3] = "unionfs.cli";
        memcpy(args + 4, argv + 1, (size_t)(argc - 1) * sizeof *args);
        execv(PYUNIONFS_PYTHON, args);
    }
    fprintf(stderr, "pyunionfs: cannot run %s: %s\n", PYUNIONFS_PYTHON, strerror(errno));
    exit(1);
}

/* What ARGV asks of the server: `[--root DIR] run ...`, a mount that may daemonize (`mount ...`,
 * or the mount-helper form, which always has -o; the server has the last word), or nothing. */
static enum request request_of(int argc, char **argv)
{
    int first = argc > 2 && strcmp(argv[1], "--root") == 0 ? 3 : 1;
    if (first < argc && strcmp(argv[first], "run") == 0)
        return RUN;
    int words = 1, options = 0;
    for (; words < argc && strcmp(argv[words], "--") != 0; words++) {
        for (size_t i = 0; i < sizeof FOREGROUND / sizeof *FOREGROUND; i++)
            if (strcmp(argv[words], FOREGROUND[i]) == 0)
                return NONE;
        options |= strncmp(argv[words], "-o", 2) == 0;
    }
    return words > 1 && (strcmp(argv[1], "mount") == 0 || options) ? MOUNT : NONE;
}

static uint64_t fnv1a(uint64_t value, const char *data, size_t length)
{
    for (size_t i = 0; i < length; i++)
        value = (value ^ (unsigned char)data[i]) * 0x100000001B3u;
    return value;
}

/* client.INSTALLATION: which Python installation's server to use (its prefix NUL PYTHONPATH). */
static uint32_t installation(void)
{
    const char *path = getenv("PYTHONPATH");
    uint64_t value = fnv1a(0xCBF29CE484222325u, PYUNIONFS_PREFIX, sizeof PYUNIONFS_PREFIX); /* NUL included */
    if (path)
        value = fnv1a(value, path, strlen(path));
    return (uint32_t)(value >> 32);
}

/* client.location(): this user's server directory in this user namespace, made if missing;
 * 0 if there is none that is surely ours alone. */
static int server_directory(char *where, size_t size)
{
    uid_t euid = geteuid();
    struct stat namespace, directory;
    if (stat("/proc/self/ns/user", &namespace) != 0)
        return 0;
    const char *base = getenv("PYUNIONFS_FORK_SERVER_DIR");
    if (!base || !*base) {
        if (euid == 0 && namespace.st_ino == INITIAL_USER_NS) {
            base = "/run/pyunionfs";
            mkdir(base, 0755);
        } else {
            base = getenv("XDG_RUNTIME_DIR");
            if (!base || !*base)
                base = "/tmp";
        }
    }
    int length = snprintf(where, size, "%s/pyunionfs-fork-%u-%lu-%08x", base, (unsigned)euid,
                          (unsigned long)namespace.st_ino, installation());
    if (length < 0 || (size_t)length >= size)
        return 0;
    mkdir(where, 0700);
    return lstat(where, &directory) == 0 && S_ISDIR(directory.st_mode) && directory.st_uid == euid &&
           !(directory.st_mode & 077);
}

/* A connection the server in WHERE has accepted, or -1. */
static int connect_server(const char *where)
{
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    int directory = -1;
    if ((size_t)snprintf(address.sun_path, sizeof address.sun_path, "%s/socket", where) >=
        sizeof address.sun_path) {
        directory = open(where, O_PATH | O_DIRECTORY | O_CLOEXEC);
        snprintf(address.sun_path, sizeof address.sun_path, "/proc/self/fd/%d/socket", directory);
    }
    int connection = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    char hello[16];
    int accepted = connection >= 0 && connect(connection, (struct sockaddr *)&address, sizeof address) == 0 &&
                   recv(connection, hello, sizeof hello, 0) == 5 && memcmp(hello, "hello", 5) == 0;
    if (directory >= 0)
        close(directory);
    if (accepted)
        return connection;
    if (connection >= 0)
        close(connection);
    return -1;
}

/* Start a server for the next caller (this one goes on without it): detached, in a session of
 * its own, with nothing of ours open, and room in its environment for its forks' titles. */
static void start_server(void)
{
    pid_t child = fork();
    if (child > 0) {
        waitpid(child, NULL, 0);
        return;
    }
    if (child < 0)
        return;
    setsid();
    if (fork() == 0) {
        int null = open("/dev/null", O_RDWR);
        for (int fd = 0; fd < 3; fd++)
            dup2(null, fd);
        syscall(SYS_close_range, 3, ~0u, 0);
        char *room = malloc(TITLE_ROOM + 1);
        if (room) {
            memset(room, '.', TITLE_ROOM);
            room[TITLE_ROOM] = '\0';
            setenv("PYUNIONFS_TITLE_ROOM", room, 1);
        }
        execl(PYUNIONFS_PYTHON, PYUNIONFS_PYTHON, "-P", "-m", "unionfs.cli", "fork-server", (char *)NULL);
    }
    _exit(0);
}

/* The request of KIND for ARGV, as the server's _take reads it. */
static struct text request_message(enum request kind, int argc, char **argv)
{
    struct text text = {0};
    char number[32];
    snprintf(number, sizeof number, "%d", PROTOCOL);
    put_field(&text, number);
    put_field(&text, KIND[kind]);
    mode_t mask = umask(0);
    umask(mask);
    snprintf(number, sizeof number, "%u", (unsigned)mask);
    put_field(&text, number);
    put_field(&text, ""); /* no name */
    put_field(&text, ""); /* no title */
    snprintf(number, sizeof number, "%d", argc - 1);
    put_field(&text, number);
    for (int i = 1; i < argc; i++)
        put_field(&text, argv[i]);
    for (char **entry = environ; *entry; entry++)
        if (strchr(*entry, '='))
            put_field(&text, *entry);
    return text;
}

/* Send the request with this process's context; a pidfd of the process that took it on, or
 * -1 if none did (*RETIRED set if the server said client.RETIRED: it exits, for a server of
 * this caller's own). */
static int send_request(int connection, const struct text *message, int *retired)
{
    int fds[] = {open(".", O_PATH | O_CLOEXEC), open("/", O_PATH | O_CLOEXEC),
                 open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC), open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC),
                 0, 1, 2};
    int pidfd = -1, opened = 1;
    for (int i = 0; i < 4; i++)
        opened &= fds[i] >= 0;
    union {
        char buffer[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {message->data, message->length};
    struct msghdr sent = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer,
                          .msg_controllen = sizeof control.buffer};
    struct cmsghdr *header = CMSG_FIRSTHDR(&sent);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(header), fds, sizeof fds);
    if (opened && sendmsg(connection, &sent, 0) == (ssize_t)message->length) {
        char reply[32];
        union {
            char buffer[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } answer;
        struct iovec reply_iov = {reply, sizeof reply};
        struct msghdr received = {.msg_iov = &reply_iov, .msg_iovlen = 1, .msg_control = answer.buffer,
                                  .msg_controllen = sizeof answer.buffer};
        ssize_t length = recvmsg(connection, &received, MSG_CMSG_CLOEXEC);
        *retired = length == 7 && memcmp(reply, "retired", 7) == 0;
        struct cmsghdr *fd = length >= 0 ? CMSG_FIRSTHDR(&received) : NULL;
        if (fd && fd->cmsg_level == SOL_SOCKET && fd->cmsg_type == SCM_RIGHTS &&
            fd->cmsg_len >= CMSG_LEN(sizeof(int))) {
            memcpy(&pidfd, CMSG_DATA(fd), sizeof pidfd);
            if (length != 2 || memcmp(reply, "go", 2) != 0) {
                close(pidfd);
                pidfd = -1;
            }
        }
    }
    for (int i = 0; i < 4; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return pidfd;
}

static ssize_t receive(int connection, char *buffer, size_t size)
{
    ssize_t length;
    do
        length = recv(connection, buffer, size, 0);
    while (length < 0 && errno == EINTR);
    return length;
}

static void forward(int signum)
{
    int saved = errno;
    forwarded = signum;
    syscall(SYS_pidfd_send_signal, launcher, signum, NULL, 0); /* ESRCH: it ended; its status is on the way */
    errno = saved;
}

/* Have the server do what ARGV asks: the exit code, or -1 if it declined (nothing was done;
 * *RETIRED as send_request sets it). */
static int hand_over(int connection, enum request kind, int argc, char **argv, int *retired)
{
    struct text message = request_message(kind, argc, argv);
    int pidfd = send_request(connection, &message, retired);
    free(message.data);
    if (pidfd < 0)
        return -1;
    if (kind == MOUNT) {
        close(pidfd);
        char reply[4096];
        ssize_t length = receive(connection, reply, sizeof reply);
        if (length == 2 && memcmp(reply, "ok", 2) == 0)
            return 0;
        if (length > 0)
            fprintf(stderr, "pyunionfs: %.*s\n", (int)length, reply);
        else
            fputs("pyunionfs: the filesystem server ended before the mount was live\n", stderr);
        return 1;
    }
    launcher = pidfd;
    struct sigaction action = {.sa_handler = forward, .sa_flags = SA_RESTART};
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++)
        sigaction(FORWARDED[i], &action, NULL);
    char reply[32];
    ssize_t length = receive(connection, reply, sizeof reply - 1);
    if (length > 5 && memcmp(reply, "exit ", 5) == 0) {
        reply[length] = '\0';
        return atoi(reply + 5);
    }
    if (forwarded) { /* it died of what it was sent before it could pass it on: so does this */
        signal(forwarded, SIG_DFL);
        raise(forwarded);
    }
    fputs("pyunionfs: the container's launcher ended without an exit status\n", stderr);
    return EXIT_LAUNCHER_ERROR;
}

int main(int argc, char **argv)
{
    enum request kind = request_of(argc, argv);
    const char *fork_server = getenv("PYUNIONFS_FORK_SERVER"); /* "off": never use it */
    char where[PATH_MAX];
    if (kind != NONE && !(fork_server && strcmp(fork_server, "off") == 0) && server_directory(where, sizeof where)) {
        int connection = connect_server(where), retired = 0;
        if (connection < 0) {
            start_server();
        } else {
            int code = hand_over(connection, kind, argc, argv, &retired);
            if (code >= 0)
                return code;
            close(connection);
            if (retired)
                start_server();
        }
    }
    run_python(argc, argv);
}
